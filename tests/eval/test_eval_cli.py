import json
import shutil

import numpy as np
import pytest

from mileloss.cli import main as cli
from mileloss.errors import CheckpointError, EvalDataError, TokenizerMismatchError
from mileloss.eval import evaluate
from tests.eval.fixtures import make_checkpoint, make_run_dir, make_tokenizer


def main(argv):
    return cli(["eval", *map(str, argv)])


@pytest.fixture
def run_dir(tmp_path, checkpoint_dir, data_dir):
    return make_run_dir(tmp_path / "run", loss="mile", final_from=checkpoint_dir, data_dir=data_dir)


def test_cli_writes_perplexity_json_into_the_run_and_prints_the_bucket_table(run_dir, data_dir, capsys):
    code = main([str(run_dir), "--data", str(data_dir), "--tasks", "none", "--max-tokens", "100",
                 "--buckets", "50,80,95"])
    assert code == 0
    result = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    assert [b["name"] for b in result["buckets"]] == ["b0", "b1", "b2", "b3"]
    assert result["bucket_cut_points"] == [50, 80, 95]
    assert result["overall"]["num_tokens"] == 100
    assert sum(b["num_tokens"] for b in result["buckets"]) == 100
    assert result["windows"]["seq_len"] == 32  # the run's training seq_len from final/mileloss_run.json
    assert result["loss_weight"]["kind"] == "mile" and "run" not in result  # the metadata stays in final/ alone
    assert not (run_dir / "eval" / "lm_eval.json").exists()
    printed = capsys.readouterr().out
    assert "cuts at 50%, 80%, 95%" in printed and "b3 (95-100%)" in printed and "overall" in printed


def test_cli_with_tasks_writes_lm_eval_json_beside_perplexity(run_dir, data_dir, benchmarks, cache_dir, capsys):
    code = main([str(run_dir), "--data", str(data_dir), "--tasks", "arc_easy", "--limit", "3", "--max-tokens", "32",
                 "--cache-dir", str(cache_dir)])
    assert code == 0
    result = json.loads((run_dir / "eval" / "lm_eval.json").read_text())
    assert list(result["tasks"]) == ["arc_easy"]
    assert result["tasks"]["arc_easy"]["n"] == 3 and 0 <= result["tasks"]["arc_easy"]["value"] <= 1
    assert "arc_easy" in capsys.readouterr().out


def test_data_dir_defaults_to_the_one_the_run_was_trained_on(run_dir, tmp_path):
    result = evaluate(run_dir, tasks="none", max_tokens=40, out_dir=tmp_path / "out")
    assert result["perplexity"]["data_dir"] == json.loads(
        (run_dir / "final" / "mileloss_run.json").read_text())["data_dir"]
    assert (tmp_path / "out" / "perplexity.json").is_file()


def test_checkpoint_without_tokenizer_is_rejected_naming_the_folder(tmp_path, checkpoint_dir, data_dir, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"{bare}: checkpoint has no tokenizer"):
        evaluate(bare, data_dir, tasks="none")
    assert main([str(bare), "--data", str(data_dir), "--tasks", "none"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_checkpoint_with_another_tokenizer_is_rejected(tmp_path, data_dir):
    other_tokenizer = make_tokenizer(tmp_path / "other_tok", corpus=["completely different words here"] * 3,
                                     vocab_size=290)
    other = make_checkpoint(tmp_path / "other", other_tokenizer)
    with pytest.raises(TokenizerMismatchError, match="was not trained on tokens of"):
        evaluate(other, data_dir, tasks="none")


def test_run_folder_without_final_model_is_rejected(tmp_path, data_dir):
    unfinished = make_run_dir(tmp_path / "unfinished")
    with pytest.raises(CheckpointError, match="final/config.json.*has not finished"):
        evaluate(unfinished, data_dir, tasks="none")


def test_missing_data_manifest_is_rejected(tmp_path, checkpoint_dir):
    with pytest.raises(EvalDataError, match="no manifest.json"):
        evaluate(checkpoint_dir, tmp_path / "nodata", tasks="none")


def test_missing_checkpoint_folder_is_rejected(tmp_path, data_dir):
    with pytest.raises(CheckpointError, match="no such run or checkpoint folder"):
        evaluate(tmp_path / "nothing", data_dir, tasks="none")


def test_eval_writes_blocks_whose_sums_equal_the_perplexity_totals_exactly(run_dir, data_dir):
    import hashlib
    import math

    from mileloss.eval.perplexity import read_blocks

    assert main([str(run_dir), "--data", str(data_dir), "--tasks", "none", "--max-tokens", "100"]) == 0
    result = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    path = run_dir / "eval" / "blocks.npz"
    assert result["blocks"] == {"file": "blocks.npz", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                "num_blocks": 4, "block": "evaluation window", "seq_len": 32}
    blocks = read_blocks(path, result["blocks"]["sha256"])
    assert blocks.start.tolist() == [0, 32, 64, 96] and blocks.length.tolist() == [32, 32, 32, 4]
    assert blocks.bucket_names == tuple(b["name"] for b in result["buckets"])
    sums, counts = blocks.totals()
    assert sums == [b["ce_sum"] for b in result["buckets"]]  # exactly: the same floats
    assert counts == [b["num_tokens"] for b in result["buckets"]]
    assert math.fsum(blocks.ce_sum.ravel().tolist()) == result["overall"]["ce_sum"]
    assert int(blocks.count.sum()) == result["overall"]["num_tokens"] == 100
    for bucket in result["buckets"]:
        if bucket["num_tokens"]:
            assert bucket["ce_sum"] / bucket["num_tokens"] == pytest.approx(bucket["loss"], rel=1e-12)
    with np.load(path, allow_pickle=False) as archive:  # plain arrays: no pickle needed to read it
        assert archive["ce_sum"].dtype == np.float64 and archive["target_hash"].dtype == np.uint64


def test_two_runs_evaluated_on_the_same_tokens_pair_block_by_block(tmp_path, run_dir, data_dir):
    from mileloss.errors import BlockMismatchError
    from mileloss.report.intervals import load_blocks, pair_blocks
    from mileloss.report.runs import load_run

    other = make_run_dir(tmp_path / "ce", loss="ce", final_from=run_dir / "final", data_dir=data_dir)
    short = make_run_dir(tmp_path / "short", loss="ce", final_from=run_dir / "final", data_dir=data_dir)
    for run, tokens in ((run_dir, "100"), (other, "100"), (short, "98")):
        assert main([str(run), "--data", str(data_dir), "--tasks", "none", "--max-tokens", tokens]) == 0
    mile, ce, cut = (load_run(r) for r in (run_dir, other, short))
    paired = pair_blocks(mile, load_blocks(mile), ce, load_blocks(ce))
    assert np.array_equal(paired.ce_sum, paired.reference_ce_sum)  # same model weights: the same sums
    with pytest.raises(BlockMismatchError, match="block 3 differs in its length"):
        pair_blocks(mile, load_blocks(mile), cut, load_blocks(cut))
