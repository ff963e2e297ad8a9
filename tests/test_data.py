import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import pytest
from conftest import hub_response

from lowmem_graph.data import bundled_dir, load_task

from lowmem_graph.questions import Question, format_prompt
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
    with pytest.raises(UserError, match="unknown split 'develop' for arc-easy.*train, validation, test"):
        load_task("arc-easy", "develop")
    assert load_task("arc-easy", "dev") == load_task("arc-easy", "validation")
    with pytest.raises(UserError, match="mmlu has no train split: train on mmlu:auxiliary_train"):
        load_task("mmlu", "train")
    with pytest.raises(UserError, match="only apply to mmlu"):
        load_task("arc-easy", "train", subjects=["anatomy"])


def test_bundled_default_is_offline(no_datasets):
    assert sorted(p.name for p in bundled_dir().glob("*.jsonl")) == ["ARC-Easy-Dev.jsonl", "ARC-Easy-Test.jsonl",
                                                                      "ARC-Easy-Train.jsonl"]
    assert len(load_task("arc-easy", "train")) == 2251
    assert len(load_task("arc-easy", "validation")) == 570
    assert len(load_task("arc-easy", "test")) == 2376


def test_hub_without_datasets_says_how_to_fix(no_datasets):
    with pytest.raises(UserError, match=r'pip install "lowmem-graph\[hub\]" \(in a clone: pip install -e "\.\[hub\]"\)'):
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


# ---- your own data ---------------------------------------------------------------------------------------------
def test_generic_jsonl_answers_as_letter_index_or_text_with_context_and_bom(tmp_path):
    rows = [{"question": "Sky?", "choices": ["blue", "green"], "answer": "A", "id": "s1"},
            {"question": "Grass?", "choices": ["blue", "green", "red"], "answer": 1, "context": "In spring."},
            {"question": "Three?", "choices": [1, 2, 3], "answer": "3"}]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    questions = load_task(str(path), "train")
    assert [(q.id, q.label, q.choices) for q in questions] == [
        ("s1", 0, ("blue", "green")), ("mine-1", 1, ("blue", "green", "red")), ("mine-2", 2, ("1", "2", "3"))]
    assert format_prompt(questions[1]).startswith("In spring.\nQuestion: Grass?\nA. blue")


def test_generic_csv_with_a_choices_list_or_letter_columns(tmp_path):
    listed = tmp_path / "a.csv"
    listed.write_text('\ufeffquestion,choices,answer\n"Sky, by day?","[""blue"", ""green""]",blue\n', encoding="utf-8")
    lettered = tmp_path / "b.csv"
    lettered.write_text("id,question,A,B,C,answer\nx1,Sky?,red,blue,,1\n", encoding="utf-8")
    assert load_task(str(listed), "train") == [Question("a-0", "Sky, by day?", ("blue", "green"), 0)]
    assert load_task(str(lettered), "train") == [Question("x1", "Sky?", ("red", "blue"), 1)]


@pytest.mark.parametrize("row, words", [
    ({"question": "Q", "choices": ["a", "b"], "answer": "C"}, ["answer 'C' is not a letter (A-B)"]),
    ({"question": "Q", "choices": ["a", "b"], "answer": 2}, ["answer index 2 is out of range for 2 choices"]),
    ({"question": "Q", "choices": ["a", "b"]}, ["missing field 'answer'"]),
    ({"question": "1+1?", "choices": ["1", "2", "3"], "answer": "2"},
     ["answer '2' is ambiguous: as a choice's text it names choice B / as an index it names choice C"]),
    ({"question": "Q", "choices": "a|b", "answer": 0}, ["'choices' must be a list"]),
    ({"choices": ["a", "b"], "answer": 0}, ["missing field 'question'"]),
])
def test_generic_rows_fail_with_their_line(tmp_path, row, words):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}),
                                                 json.dumps(row)])
    with pytest.raises(UserError) as e:
        load_task(str(path), "train")
    assert str(e.value).startswith(f"{path}:2: ") and all(w in str(e.value) for w in words)


def test_a_folder_of_split_files(tmp_path):
    row = {"question": "Q", "choices": ["a", "b"], "answer": "b"}
    write_lines(tmp_path / "mine" / "train.jsonl", [json.dumps(row)] * 3)
    write_lines(tmp_path / "mine" / "dev.jsonl", [json.dumps(row)])
    assert len(load_task(str(tmp_path / "mine"), "train")) == 3
    assert len(load_task(str(tmp_path / "mine"), "validation")) == 1
    with pytest.raises(UserError, match="no test file"):
        load_task(str(tmp_path / "mine"), "test")


def test_limit_draws_across_subjects(tmp_path):
    write_mmlu(tmp_path)
    everything = load_task("mmlu", "test", tmp_path)
    assert len({q.subject for q in everything}) > 1
    drawn = load_task("mmlu", "test", tmp_path, limit=2)
    assert len(drawn) == 2 and len({q.subject for q in drawn}) == 2


def test_a_hub_data_set_by_id_with_a_column_mapping(monkeypatch):
    rows = [{"q": "Sky?", "opts": {"text": ["red", "blue"], "label": ["x", "y"]}, "key": "y", "area": s}
            for s in ("a", "a", "b")]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: {
        ("org/mcq", "easy", "train"): rows}[name, config, split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    columns = "question=q,choices=opts.text,labels=opts.label,answer=key,subject=area"
    questions = load_task("hf:org/mcq/easy", "train", columns=columns)
    assert [(q.question, q.choices, q.label, q.subject) for q in questions][0] == ("Sky?", ("red", "blue"), 1, "a")
    assert [q.subject for q in load_task("hf:org/mcq/easy", "train", columns=columns, limit=2)] == ["a", "b"]
    with pytest.raises(UserError, match="row 0: no column 'question'"):
        load_task("hf:org/mcq/easy", "train")
    with pytest.raises(UserError, match="expected FIELD=COLUMN"):
        load_task("hf:org/mcq/easy", "train", columns="prompt=q")


@pytest.mark.parametrize("error, words", [
    (ConnectionError("Couldn't reach 'org/x' on the Hub (LocalEntryNotFoundError)"), "cannot reach the Hugging Face"),
    ("gated", "is gated on the Hugging Face hub: accept its licence"),
    ("missing", "does not exist on the Hugging Face hub"),
])
def test_hub_failures_are_one_line_and_told_apart(monkeypatch, error, words):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = hub_response(401 if error == "gated" else 404)
    error = {"gated": GatedRepoError("401 Client Error", response=response),
             "missing": RepositoryNotFoundError("404 Client Error", response=response)}.get(error, error)

    def load_dataset(name, config, split):
        raise error

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match=words):
        load_task("arc-challenge", "train")


@pytest.mark.skipif(__import__("importlib").util.find_spec("datasets") is None, reason="datasets is not installed")
def test_no_network_with_datasets_installed_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub|does not exist"):
        load_task("hf:nobody-here/no-such-data-xyz", "train")


def test_what_counts_as_a_path_task_and_how_parts_parse(tmp_path, monkeypatch):
    from lowmem_graph.data import is_path_task
    from lowmem_graph.data import task_part
    from lowmem_graph.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mmlu").mkdir()                        # a folder named like a task does not turn the task into it
    assert not is_path_task("mmlu") and not is_path_task("hf:org/name") and is_path_task("my/data")
    odd = tmp_path / "a:b@v2.jsonl"
    odd.write_text("")
    assert task_part(str(odd)) == (str(odd), [], "")
    assert task_part("hf:org/name/cfg:train,dev@5") == ("hf:org/name/cfg", ["train", "dev"], "5")
    assert task_part("mmlu:auxiliary_train@14042") == ("mmlu", ["auxiliary_train"], "14042")
    TrainConfig(task="hf:allenai/ai2_arc/ARC-Challenge").check_splits()     # no split file, no refusal
    TrainConfig(task="mmlu:auxiliary_train,dev").check_splits()


def test_columns_reach_only_the_hub_parts_of_a_task(monkeypatch):
    from lowmem_graph.train import load_questions

    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: [
        {"q": "Sky?", "opts": ["red", "blue"], "key": 1}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    questions = load_questions("arc-easy+hf:org/x", "validation", limit=2, columns="question=q,choices=opts,answer=key")
    assert len(questions) == 3 and questions[-1].label == 1


def test_questions_drawn_into_training_are_left_out_of_evaluation():
    """The paper's protocol trains on draws from a split it evaluates on: those questions are not scored."""
    from lowmem_graph.data import leave_out_trained
    from lowmem_graph.train import load_questions

    trained = load_questions("arc-easy:train+arc-easy:validation@50", "train")
    evaluated = load_questions("arc-easy", "validation")
    kept = leave_out_trained(evaluated, trained)
    drawn = {q.id for q in trained} & {q.id for q in evaluated}
    assert len(drawn) == 50 and len(kept) == len(evaluated) - 50
    assert not {q.id for q in kept} & drawn
    # a question with another's id but other text is another question
    other = [dataclasses.replace(q, question=q.question + " (rephrased)") for q in evaluated[:3]]
    assert leave_out_trained(other, evaluated) == other
