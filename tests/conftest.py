"""8 virtual CPU devices for the sharding tests: must be set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI caches compiled programs in ~/.cache by default: tests leave the home folder alone (the cache's own
# test gives a temporary folder)
os.environ.setdefault("RRM_JAX_COMPILE_CACHE", "off")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA:CPU maps about 3-4 memory regions per compiled program and frees them only with the program, while Linux
# caps a process at vm.max_map_count regions (65,530 by default): the whole suite in one process compiles more
# than that, and past the cap LLVM's next mmap fails inside the compiler as a segmentation fault. Programs are
# released between modules once the process holds half the cap, so modules still share compilations below it.
MAP_REGIONS_BEFORE_RELEASE = 32_000


def _map_regions() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such cap to stay under
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_near_the_map_cap():
    yield
    if _map_regions() > MAP_REGIONS_BEFORE_RELEASE:
        jax.clear_caches()
        gc.collect()
