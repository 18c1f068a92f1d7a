"""cli.py: every numeric flag of train.py and eval.py is range-checked when parsed (argparse's
own error, exit 2, nothing created), and what only stage 4 would find fails before stage 1."""
import json
import shutil

import pytest
import torch

import cli
import eval as ev
import models
import train
import train_cli
from test_reliability import assert_one_line_error
from tiny import tiny_flags

TRAIN_BAD = [
    ("--epochs", "0", "0 is out of range: expected an integer >= 1"),
    ("--max-steps", "0", "0 is out of range: expected an integer >= 1; leave the flag out for no limit"),
    ("--grad-accum", "0", "expected an integer >= 1"),
    ("--log-every", "0", "expected an integer >= 1"),
    ("--batch-size", "0", "expected an integer >= 1"),
    ("--chunk-size", "0", "expected an integer >= 1"),
    ("--eval-batch-size", "-1", "-1 is out of range: expected an integer >= 1"),
    ("--rank", "0", "expected an integer >= 1"),
    ("--limit-train", "1", "1 is out of range: expected an integer >= 2; the 80/20 split needs 2 items"),
    ("--limit-eval", "0", "0 is out of range: expected an integer >= 1; leave the flag out to use every item"),
    ("--limit-eval", "-3", "expected an integer >= 1"),
    ("--warmup-steps", "-1", "expected an integer >= 0"),
    ("--save-every", "-1", "expected an integer >= 0"),
    ("--seed", "-1", "expected an integer >= 0"),
    ("--max-len", "2", "2 is out of range: expected an integer >= 3 (BOS, one answer token and EOS)"),
    ("--alpha", "0", "0 is out of range: expected a number > 0"),
    ("--alpha", "-256", "expected a number > 0"),
    ("--temperature", "0", "0 is out of range: expected a number > 0"),
    ("--lr", "nan", "nan is out of range: expected a number > 0"),
    ("--lr", "0", "expected a number > 0"),
    ("--weight-decay", "-0.1", "expected a number >= 0"),
    ("--max-grad-norm", "-1", "expected a number >= 0"),
    ("--ce-weight", "inf", "inf is out of range: expected a number >= 0"),
    ("--dropout", "1", "1 is out of range: expected a number >= 0 and < 1"),
    ("--epochs", "two", "'two' is not an integer"),
]


def full(value: str, message: str) -> str:
    return f"{value} is out of range: {message}" if message.startswith("expected") else message


def argparse_error(capsys, argv_main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        argv_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return [line for line in err.splitlines() if ": error: " in line][0]


@pytest.mark.parametrize("flag, value, message", TRAIN_BAD)
def test_train_flag_out_of_range_is_argparses_error_before_anything(flag, value, message, tmp_path, capsys):
    out = tmp_path / "run"
    line = argparse_error(capsys, train.main, ["--old", "a", "--new", "b", "--task", "piqa", "--out", str(out),
                                               flag, value])
    assert f": error: argument {flag}: {full(value, message)}" in line
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--limit", "0", "0 is out of range: expected an integer >= 1; leave the flag out to use every item"),
    ("--limit", "-5", "expected an integer >= 1"),
    ("--batch-size", "0", "expected an integer >= 1"),
    ("--num-fewshot", "-1", "expected an integer >= 0"),
    ("--device", "tpu9", "'tpu9' is not a torch device"),
    *([("--device", "cuda", "'cuda' is not available on this machine; pass --device cpu, or leave --device out")]
      if not torch.cuda.is_available() else []),
])
def test_eval_flag_out_of_range_or_unavailable_device(flag, value, message, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    line = argparse_error(capsys, ev.main, ["--model", "a", "--task", "piqa", "--out", str(out), flag, value])
    assert f": error: argument {flag}: {full(value, message)}" in line
    assert not out.exists()


def test_number_accepts_the_range_bounds():
    assert cli.number(float, 0, 1, high_open=True)("0") == 0.0 and cli.POSITIVE_INT("1") == 1
    assert cli.device("cpu") == "cpu"
    args = train_cli.parse_args(["--old", "a", "--new", "b", "--task", "piqa", "--max-len", "3", "--save-every", "0",
                             "--warmup-steps", "0", "--max-grad-norm", "0", "--dropout", "0.5"])
    assert (args.max_len, args.save_every, args.dropout) == (3, 0, 0.5)


def test_short_cuts_the_middle_of_long_values():
    assert cli.short("abc") == "'abc'"
    cut = cli.short("x" * 50_000 + "END", limit=80)
    assert len(cut) <= 80 and cut.startswith("'xxx") and cut.endswith("END'") and " ... " in cut


def test_an_item_stage_4_cannot_score_stops_the_run_before_stage_1(tiny_models, data_dir, tmp_path, capsys):
    """A test item whose answer is longer than the model's context would end stage 4 after
    three trained stages; it is found before stage 1, and nothing is created."""
    real, data_dir = data_dir, tmp_path / "data"
    shutil.copytree(real / "piqa", data_dir / "piqa")
    valid = data_dir / "piqa" / "valid.jsonl"
    lines = valid.read_text().splitlines()
    record = json.loads(lines[3])
    record["sol2"] = "twist the lid " * 1000
    valid.write_text("\n".join(lines[:3] + [json.dumps(record)] + lines[4:]) + "\n")
    out = tmp_path / "run"
    assert train.main(tiny_flags(*tiny_models, data_dir, out)) == 2
    tok, context = models.load_tokenizer(tiny_models[0]), "Question: " + record["goal"] + "\nAnswer:"
    n = len(tok.encode(context + " " + record["sol2"], add_bos=False)) - len(tok.encode(context, add_bos=False))
    assert n > 2048
    assert_one_line_error(capsys.readouterr().err, "item piqa/validation/3 cannot be scored: continuation ' twist the lid",
                          " ... ", f"encodes to {n} tokens; scoring needs 1 to max_length=2048")
    assert not out.exists()


class _Writes:
    """A stand-in stderr that records each write call."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    # torchrun's ranks share one stderr pipe: a line written in pieces interleaves with another
    # rank's line (two `error:` lines glued into one), a single write below PIPE_BUF does not.
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    assert cli.fail("hub repo 'org/v2' is gated") == 2
    assert cli.fail("diverged", status=1) == 1
    assert cli.interrupted("checkpoints are kept") == 130
    assert stderr.calls == ["error: hub repo 'org/v2' is gated\n", "error: diverged\n",
                            "interrupted (Ctrl-C); checkpoints are kept\n"]
