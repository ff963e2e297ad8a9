import json
import os
import sys
import types
from pathlib import Path

import pytest

from lowmem_graph.data import Question, bundled_dir, format_prompt, load_task
from lowmem_graph.errors import UserError

SHARED_DATA = Path(os.environ.get("LOWMEM_GRAPH_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "arc").is_dir(), reason=f"no shared data at {SHARED_DATA}")


def arc_row(qid="q1", labels="ABCD", answer="B"):
    choices = [{"text": f"choice {label}", "label": label} for label in labels]
    return {"id": qid, "question": {"stem": f"stem of {qid}", "choices": choices}, "answerKey": answer}


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def no_datasets(monkeypatch):
    """Make `import datasets` fail, as on an install without the [hub] extra."""
    monkeypatch.setitem(sys.modules, "datasets", None)


@needs_shared
@pytest.mark.parametrize(
    "task, sizes",
    [("arc-challenge", (1119, 299, 1172)), ("arc-easy", (2251, 570, 2376)), ("openbookqa", (4957, 500, 500))],
)
def test_shared_split_sizes_and_labels(task, sizes):
    for split, size in zip(("train", "validation", "test"), sizes):
        questions = load_task(task, split, SHARED_DATA)
        assert len(questions) == size
        assert len({q.id for q in questions}) == size
        for q in questions:
            assert 2 <= len(q.choices) <= 5
            assert type(q.label) is int and 0 <= q.label < len(q.choices)
            assert q.question and q.subject == ""


@needs_shared
def test_real_numeric_labels_map_to_index():
    questions = {q.id: q for q in load_task("arc-easy", "validation", SHARED_DATA / "arc")}
    q = questions["NYSEDREGENTS_2014_8_8"]  # labels "1".."4", answerKey "2"
    assert q.label == 1 and q.choices[q.label] == "pedigree chart"


def test_numeric_labels_in_tmp_file(tmp_path):
    write_lines(tmp_path / "ARC-Challenge-Train.jsonl", [json.dumps(arc_row(labels="1234", answer="4"))])
    [q] = load_task("arc-challenge", "train", tmp_path)
    assert q.label == 3 and q.choices == ("choice 1", "choice 2", "choice 3", "choice 4")


def test_obqa_layouts_and_limit(tmp_path):
    rows = [json.dumps(arc_row(f"q{i}")) for i in range(5)]
    write_lines(tmp_path / "openbookqa" / "dev.jsonl", rows)
    assert [q.id for q in load_task("openbookqa", "val", tmp_path, limit=3)] == ["q0", "q1", "q2"]
    write_lines(tmp_path / "flat" / "test.jsonl", rows)
    assert len(load_task("openbookqa", "test", tmp_path / "flat")) == 5


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "q2", "question": ', "bad JSON"),
        (json.dumps({"id": "q2", "answerKey": "A"}), "missing field 'question'"),
        (json.dumps(arc_row("q2", answer="E")), "answer 'E' is not among"),
        (json.dumps(arc_row("q2", labels="A", answer="A")), "1 choices"),
        (json.dumps(arc_row("q2", labels="ABCDEF", answer="A")), "6 choices"),
    ],
)
def test_malformed_jsonl_reports_path_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "ARC-Easy-Test.jsonl", [json.dumps(arc_row()), "", bad_line])
    with pytest.raises(UserError, match=message) as info:
        load_task("arc-easy", "test", tmp_path)
    assert f"{path}:3:" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match="ARC-Challenge-Dev.jsonl") as info:
        load_task("arc-challenge", "validation", tmp_path)
    assert str(tmp_path / "arc" / "ARC-Challenge-Dev.jsonl") in str(info.value)


def write_mmlu(root):
    """A tiny official-layout tree: two subjects, three splits; row 1 of astronomy_test spans two lines."""
    data = root / "data"
    for split in ("dev", "val", "test"):
        write_lines(data / split / f"anatomy_{split}.csv", [f"Bone count {split}?,206,207,208,209,A"])
    write_lines(data / "dev" / "astronomy_dev.csv", ['"Sun, or moon?",sun,moon,both,neither,A'])
    write_lines(data / "val" / "astronomy_val.csv", ["Planets?,7,8,9,10,B"])
    write_lines(
        data / "test" / "astronomy_test.csv",
        ['"Which line\nis this?",one,two,three,four,B', '"A, B, or C?",a,b,"c, really",d,C'],
    )
    return data


def test_mmlu_local_tree(tmp_path):
    write_mmlu(tmp_path)
    test = load_task("mmlu", "test", tmp_path)
    assert [(q.subject, q.label) for q in test] == [("anatomy", 0), ("astronomy", 1), ("astronomy", 2)]
    assert test[1].question == "Which line\nis this?"
    assert test[2].choices == ("a", "b", "c, really", "d")
    assert len({q.id for q in test}) == 3
    dev = load_task("mmlu", "dev", tmp_path / "data", subjects="astronomy")
    assert [(q.question, q.label) for q in dev] == [("Sun, or moon?", 0)]
    assert [q.label for q in load_task("mmlu", "val", tmp_path)] == [0, 1]
    assert len(load_task("mmlu", "validation", tmp_path, subjects=["anatomy"])) == 1


def test_mmlu_other_layouts_and_auxiliary_train(tmp_path):
    write_mmlu(tmp_path / "mmlu")
    assert len(load_task("mmlu", "test", tmp_path)) == 3
    write_lines(tmp_path / "data" / "auxiliary_train" / "race.csv", ["Q?,a,b,c,d,D"])
    [q] = load_task("mmlu", "auxiliary_train", tmp_path)
    assert q.label == 3 and q.subject == ""


@pytest.mark.parametrize(
    "bad_row, message",
    [("Too few,a,b,c,A", "5 columns, expected 6"), ("Bad letter?,a,b,c,d,E", "answer 'E' is not among")],
)
def test_mmlu_bad_row_reports_start_line(tmp_path, bad_row, message):
    data = write_mmlu(tmp_path)
    path = data / "test" / "astronomy_test.csv"
    with open(path, "a", encoding="utf-8") as f:
        f.write('"Spans\nthree\nlines",a,b,c,d,A\n' + bad_row + "\n")  # the bad row starts on line 7
    with pytest.raises(UserError, match=message) as info:
        load_task("mmlu", "test", tmp_path)
    assert f"{path}:7:" in str(info.value)


def test_mmlu_missing_subject_and_folder(tmp_path):
    write_mmlu(tmp_path)
    with pytest.raises(UserError, match="biology_test.csv"):
        load_task("mmlu", "test", tmp_path, subjects=["biology"])
    with pytest.raises(UserError, match="auxiliary_train"):
        load_task("mmlu", "auxiliary_train", tmp_path)


def test_unknown_task_and_split():
    with pytest.raises(UserError, match="unknown task 'squad'.*arc-challenge, arc-easy, openbookqa, mmlu"):
        load_task("squad", "train")
    with pytest.raises(UserError, match="unknown split 'dev' for arc-easy.*train, validation, test"):
        load_task("arc-easy", "dev")
    with pytest.raises(UserError, match="unknown split 'train' for mmlu.*auxiliary_train"):
        load_task("mmlu", "train")
    with pytest.raises(UserError, match="only apply to mmlu"):
        load_task("arc-easy", "train", subjects=["anatomy"])


def test_bundled_default_is_offline(no_datasets):
    assert sorted(p.name for p in bundled_dir().glob("*.jsonl")) == ["ARC-Easy-Dev.jsonl", "ARC-Easy-Train.jsonl"]
    assert len(load_task("arc-easy", "train")) == 2251
    assert len(load_task("arc-easy", "validation")) == 570


def test_hub_without_datasets_says_how_to_fix(no_datasets):
    with pytest.raises(UserError, match=r"pip install 'lowmem-graph\[hub\]' or pass --data-dir"):
        load_task("arc-challenge", "train")


def test_hub_rows_are_converted(monkeypatch):
    hub = {
        ("allenai/ai2_arc", "ARC-Challenge", "test"): [
            {"id": "a1", "question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
             "answerKey": "3"}
        ],
        ("allenai/openbookqa", "main", "train"): [
            {"id": "o1", "question_stem": "O?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
             "answerKey": "B"}
        ],
        ("cais/mmlu", "all", "validation"): [
            {"question": f"M{i}?", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i}
            for i, s in enumerate(["anatomy", "anatomy", "astronomy"])
        ],
        ("cais/mmlu", "all", "dev"): [{"question": "M?", "subject": "x", "choices": ["a", "b"], "answer": 2}],
    }
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: hub[name, config, split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_task("arc-challenge", "test") == [Question("a1", "Q?", ("x", "y", "z"), 2)]
    assert load_task("openbookqa", "train")[0].label == 1
    mmlu = load_task("mmlu", "val")
    assert [(q.id, q.subject, q.label) for q in mmlu] == [
        ("anatomy_val-0", "anatomy", 0), ("anatomy_val-1", "anatomy", 1), ("astronomy_val-0", "astronomy", 2)
    ]
    with pytest.raises(UserError, match="cais/mmlu dev row 0: answer 2 is not among"):
        load_task("mmlu", "dev")


def test_format_prompt():
    q = Question("q", "Which is a planet?", ("Mars", "the Moon", "the Sun"), 0)
    assert format_prompt(q) == "Question: Which is a planet?\nA. Mars\nB. the Moon\nC. the Sun\nAnswer:"


@needs_shared
def test_format_prompt_on_real_row():
    q = load_task("arc-easy", "train", SHARED_DATA, limit=1)[0]
    assert q.id == "Mercury_7220990" and q.label == 1
    assert format_prompt(q) == (
        "Question: Which factor will most likely cause a person to develop a fever?\n"
        "A. a leg muscle relaxing after exercise\n"
        "B. a bacterial population in the bloodstream\n"
        "C. several viral particles on the skin\n"
        "D. carbohydrates being digested in the stomach\n"
        "Answer:"
    )
