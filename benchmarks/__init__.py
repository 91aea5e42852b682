"""aa-trt benchmarks (docs/performance.md). A package, so that its test modules never clash by name
with those of tests/ when both folders are collected together."""
