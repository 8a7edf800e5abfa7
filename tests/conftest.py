"""Test setup: 8 virtual CPU devices (before jax is imported) for sharding tests, and a
private cache for the embedded corpus."""

import os
import tempfile

# Tiny test models spend their time in XLA's compiler, not in the compiled code: skip the
# expensive LLVM passes (results are the same, compiles take about half as long).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXPT_CACHE_DIR", tempfile.mkdtemp(prefix="jaxpt-test-cache-"))
