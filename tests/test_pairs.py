"""The paper's model updates by name (pairs.py), train.py --list-pairs, the refusal of the
updates into Llama 3, and the pinned hub commits of the registry and the data sets."""
import re
from pathlib import Path

import pytest

import data
import models
import pairs
import train
import train_cli

ROOT = Path(__file__).resolve().parent.parent

# Table 8 of the paper (appendix A.2), as printed there.
TABLE_8 = [("Phi 1", "Phi 1.5"), ("Phi 1", "Phi 2"), ("Phi 1.5", "Phi 2"), ("Vicuna 1.3", "Vicuna 1.5"),
           ("Llama 1", "Llama 2"), ("Llama 1", "Vicuna 1.5"), ("Llama 1", "Vicuna 1.3"),
           ("Vicuna 1.3", "Llama 2"), ("Llama 2", "Vicuna 1.5"), ("Llama 2", "Llama 3"),
           ("Llama 1", "Llama 3"), ("Vicuna 1.3", "Llama 3"), ("Vicuna 1.5", "Llama 3")]


def registry_name(printed: str) -> str:
    return printed.lower().replace(" ", "")


def test_the_list_holds_table_8_and_the_smollm_update():
    paper = [p for p in pairs.PAIRS if p.source == "Table 8"]
    assert [(p.old, p.new) for p in paper] == [tuple(map(registry_name, t)) for t in TABLE_8]
    refused = [(p.old, p.new) for p in pairs.PAIRS if p.status != pairs.TRAINS]
    assert refused == [(registry_name(a), "llama3") for a, b in TABLE_8 if b == "Llama 3"]
    assert [(p.old, p.new) for p in pairs.PAIRS if p.source != "Table 8"] == [("smollm-135m", "smollm2-135m")]
    assert (models.REGISTRY["smollm-135m"], models.REGISTRY["smollm2-135m"]) == \
        ("HuggingFaceTB/SmolLM-135M", "HuggingFaceTB/SmolLM2-135M")


def test_list_pairs_prints_the_table_the_readme_shows(capsys):
    with pytest.raises(SystemExit) as done:
        train_cli.parse_args(["--list-pairs"])  # no --old/--new/--task needed
    assert done.value.code == 0
    printed = capsys.readouterr().out
    rows = printed.strip().splitlines()[2:]
    assert len(rows) == 14 and printed.strip() == pairs.table()
    assert "| `llama2` | `llama3` | `meta-llama/Llama-2-7b-hf@01c7f73d77` |" in rows[9]
    assert rows[9].endswith("| Table 8 | needs `--cross-vocab`: changes the vocabulary |")
    assert sum(r.endswith("| trains as is |") for r in rows) == 10
    assert pairs.table() in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("old, new", [("llama2", "llama3"), ("vicuna1.5", "llama3"),
                                      ("huggyllama/llama-7b", "meta-llama/Meta-Llama-3-8B")])
def test_updates_into_llama3_are_refused_before_anything(old, new, tmp_path, capsys, monkeypatch):
    def no_download(repo_id, *args, **kwargs):
        raise AssertionError(f"downloaded {repo_id}")
    monkeypatch.setattr(models, "download", no_download)
    out = tmp_path / "run"
    assert train.main(["--old", old, "--new", new, "--task", "piqa", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --old {old} -> --new {new} changes the vocabulary: ") and err.count("\n") == 1
    assert f"python eval.py --model {old} --task TASK --out m1.jsonl" in err
    assert "python eval.py compare m1.jsonl m2.jsonl" in err and "Pass --cross-vocab fill" in err
    assert not out.exists()


def test_registry_entries_and_data_sets_are_pinned_to_hub_commits():
    assert set(models.PINS) == set(models.REGISTRY.values())
    commits = [pin.commit for pin in models.PINS.values()] + [c.revision for c in data.HUB.values()]
    assert all(re.fullmatch("[0-9a-f]{40}", commit) for commit in commits)
    assert all(pin.source for pin in models.PINS.values()) and all(c.source for c in data.HUB.values())
    assert models.unpinned() == []
    assert pairs.pins_table() in (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(pairs.pins_table().splitlines()) == 2 + len(models.PINS) + len(data.HUB)


def test_an_entry_without_a_commit_says_so_and_follows_main(monkeypatch, tmp_path):
    monkeypatch.setitem(models.PINS, "HuggingFaceTB/SmolLM-135M", models.Pin(None, "no public record"))
    assert models.unpinned() == ["smollm-135m"]
    assert "| `HuggingFaceTB/SmolLM-135M` (unpinned: no public record) |" in pairs.table()
    assert "| `HuggingFaceTB/SmolLM-135M` | model | unpinned | no public record |" in pairs.pins_table()
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        path = tmp_path / repo_id.replace("/", "--")
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"")
        return str(path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(models, "_SNAPSHOTS", {})
    models.download("microsoft/phi-2")
    models.download("HuggingFaceTB/SmolLM-135M")
    assert calls == [("microsoft/phi-2", "ef382358ec9e382308935a992d908de099b64c23"),
                     ("HuggingFaceTB/SmolLM-135M", None)]
