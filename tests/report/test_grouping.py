"""Runs that differ only by seed, output folder and the folder their (identical) data was prepared in are one group."""

from pathlib import Path

from mileloss.report.runs import RunRecord, group_runs


def record(seed: int, data_dir: str, manifest_sha256: str) -> RunRecord:
    config = {"run": {"seed": seed, "out": f"runs/s{seed}"}, "data": {"dir": data_dir},
              "loss": {"kind": "mile", "gamma": 1.0, "sigma": 1.0}}
    identity = {"data_dir": data_dir, "manifest_sha256": manifest_sha256, "tokenizer_sha256": "t", "vocab_size": 64}
    return RunRecord(path=Path(f"runs/s{seed}"), config=config, train=[], val=[], perplexity=None, lm_eval=None,
                     run_info={"data": identity})


def test_the_same_data_prepared_in_two_folders_groups_the_seeds_together():
    groups = group_runs([record(111, "out-a/data/shakespeare", "m1"), record(112, "out-b/data/shakespeare", "m1")])
    assert len(groups) == 1 and groups[0].seeds == [111, 112]


def test_different_data_keeps_the_runs_apart():
    groups = group_runs([record(111, "out-a/data/shakespeare", "m1"), record(112, "out-b/data/shakespeare", "m2")])
    assert len(groups) == 2


def test_without_a_recorded_identity_the_data_folder_decides():
    a, b = record(111, "out-a/data", "m1"), record(112, "out-b/data", "m1")
    a.run_info.clear()
    b.run_info.clear()
    assert len(group_runs([a, b])) == 2
