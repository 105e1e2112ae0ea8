from pathlib import Path


def resolve_uri(cfg, runs_root) -> str:
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"
