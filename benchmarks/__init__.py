"""Speed and memory benchmarks (not timed tests); each module has a `main(argv)`."""
