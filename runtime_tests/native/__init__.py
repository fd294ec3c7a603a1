"""Code that runs inside a runtime's worker process (runtime_tests.isolation): it imports the
runtime, numpy and d2quant.errors only, so a worker starts fast and a crash stays in it."""
