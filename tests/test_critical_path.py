"""scripts/profile_decode_step.py's critical path: what each kernel of a replay adds to its end (BENCHMARKS.md's tables)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_decode_step.py"


def _critical_path():
    spec = importlib.util.spec_from_file_location("profile_decode_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.critical_path


def test_overlapping_kernels_add_only_what_ends_after_the_latest_end():
    # a: 0-10; b starts early (PDL) and ends at 12: adds 2; c ends inside b: adds 0; a again after a gap: adds its end - 12
    table = _critical_path()([("a", 0, 10), ("b", 2, 10), ("c", 3, 4), ("a", 15, 3)])
    assert table == {"a <- (first)": [1, 10.0, 10.0], "b <- a": [1, 2.0, 10.0], "c <- b": [1, 0.0, 4.0], "a <- c": [1, 6.0, 3.0]}
    assert sum(row[1] for row in table.values()) == 18.0  # the chain's end minus its start


def test_one_kernel_name_is_told_apart_by_the_kernel_before_it():
    layer = [("norm", 0, 1), ("linear", 1, 5), ("attention", 6, 2), ("linear", 8, 3)]
    chain = [(name, start + offset, duration) for offset in (0, 11) for name, start, duration in layer]
    table = _critical_path()(chain)
    assert table["linear <- norm"][:2] == [2, 10.0] and table["linear <- attention"][:2] == [2, 6.0]
