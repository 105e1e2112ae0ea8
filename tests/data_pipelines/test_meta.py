"""`Meta` (a build's meta.json) written and read by one class, and the registry of data set specs
that the config's choices, the builder's command line and the loaders read."""

from __future__ import annotations

import json

import pytest

from data_pipelines import DataConfig, DataError
from data_pipelines.build import _parser
from data_pipelines.config import check_data_config
from data_pipelines.meta import Meta
from data_pipelines.registry import DATASETS, SPECS, read_meta, spec


def _meta(**fields) -> Meta:
    return Meta(**{"dataset": "delayed_xor", "num_classes": 2, "classes": ["a", "b"], "in_chans": 20,
                   "counts": {"train": 4, "val": 2}, "T": 25, "readout_from": 15, **fields})


def test_write_then_read_gives_the_same_record_with_details_flat_in_the_file(tmp_path):
    meta = _meta(details={"delay": 5})
    meta.write(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["delay"] == 5  # flat, for people
    assert Meta.read(tmp_path) == meta
    with pytest.raises(ValueError, match="repeats typed fields"):
        _meta(details={"T": 3}).write(tmp_path)


@pytest.mark.parametrize("content, pattern", [
    (None, "no built data set at .* build it with: python -m data_pipelines.build delayed_xor --out"),
    ("{not json", "is unreadable"),
    ("[1, 2]", "is unreadable"),
    ('{"format_version": 0, "dataset": "delayed_xor"}', "format version 0"),
    ('{"format_version": 1, "dataset": "delayed_xor", "num_classes": 2}', "missing .*required"),
])
def test_a_missing_or_broken_meta_is_one_line_naming_the_build_command(tmp_path, content, pattern):
    if content is not None:
        (tmp_path / "meta.json").write_text(content)
    with pytest.raises(DataError, match=pattern) as err:
        read_meta(tmp_path, "delayed_xor")
    assert "\n" not in str(err.value) and "python -m data_pipelines.build delayed_xor" in str(err.value)


def test_every_registered_set_is_a_config_choice_and_a_builder_command():
    assert DATASETS == tuple(SPECS) and len(set(DATASETS)) == len(DATASETS)
    assert {"delayed_xor", "mnist1d", "digits", "seqdigits", "dvs"} <= set(DATASETS)
    builder = _parser()
    for name in DATASETS:
        check_data_config(DataConfig(dataset=name, path="x"))
        args = ["--out", "x"] + (["--src", "y"] if spec(name).needs_src else [])
        args += ["--set", "nmnist"] if name == "dvs" else []
        assert builder.parse_args([name, *args]).dataset == name
    with pytest.raises(DataError, match="is not one of digits, cifar10"):
        spec("mnist")


def test_flip_translate_and_resizing_apply_where_the_specs_say():
    for name in DATASETS:
        s = spec(name)
        if s.flip is None:
            with pytest.raises(DataError, match="data.flip=true"):
                check_data_config(DataConfig(dataset=name, flip=True))
        else:
            check_data_config(DataConfig(dataset=name, flip=True))
        if s.translate is None:
            with pytest.raises(DataError, match="data.translate=2"):
                check_data_config(DataConfig(dataset=name, translate=2))
        if s.resolution is None:
            with pytest.raises(DataError, match="data.resolution=64"):
                check_data_config(DataConfig(dataset=name, resolution=64))
    assert [n for n in DATASETS if spec(n).resolution is not None] == ["imagenet"]
