"""8 virtual CPU devices for the sharding tests: must be set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI caches compiled programs in ~/.cache by default: tests leave the home folder alone (the cache's own
# test gives a temporary folder)
os.environ.setdefault("RRM_JAX_COMPILE_CACHE", "off")
