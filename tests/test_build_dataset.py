"""`feallm build-dataset` on tiny Aff-Wild2 trees: split, sampling, files, report."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from feallm_llava.cli import main
from feallm_llava.facs.labels import AUS, EXPRESSIONS
from feallm_llava.data.records import Annotation, FaceRecord, validate_annotation
from feallm_llava.data.split import parse_class_caps, split_and_sample
from feallm_llava.data.templates import load_templates
from feallm_llava.facs.parse import parse_aus
from feallm_llava.testing.fake_openai import start_fake_openai
from tests.test_affwild2 import au_row, make_affwild2_tree, write_video
from tests.test_annotate_openai import good

VIDEOS = ["v1", "v2", "v3", "v4", "v5_left", "v5_right", "v6"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_affwild2_tree(tmp_path_factory.mktemp("aw2"), videos=VIDEOS, frames=7)


def build(tree: Path, out: Path, *extra: str) -> int:
    return main(["build-dataset", "--root", str(tree), "--out", str(out), "--annotator", "template",
                 "--train-size", "30", "--eval-size", "8", "--no-progress", *extra])


def load(out: Path, name: str):
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert build(tree, out) == 0
    return out


# -- split and sampling ----------------------------------------------------------------------------

def _records(n_persons=8, frames=10):
    return [FaceRecord(image=Path(f"/x/p{p}/{f:05d}.jpg"), expression=EXPRESSIONS[(p + f) % 7],
                       aus={au: 0 for au in AUS}, subject=f"p{p}" + ("_left" if p % 3 == 0 else ""),
                       video=f"p{p}", frame=f)
            for p in range(n_persons) for f in range(1, frames + 1)]


def test_split_puts_each_person_on_one_side_only():
    records = _records() + [FaceRecord(image=Path(f"/x/p0r/{f:05d}.jpg"), expression="Neutral",
                                       aus={au: 0 for au in AUS}, subject="p0_right", video="p0_right",
                                       frame=f) for f in range(1, 6)]
    for seed in range(10):
        split = split_and_sample(records, train_size=60, eval_size=15, seed=seed)
        train, evals = {r.person for r in split.train}, {r.person for r in split.eval}
        assert train and evals and not train & evals
        sides = {("eval" if r in split.eval else "train") for r in split.train + split.eval
                 if r.subject in ("p0_left", "p0_right")}
        assert len(sides) == 1  # both halves of the two-person video on one side


def test_sampling_is_seeded_and_honours_sizes():
    records = _records()
    a = split_and_sample(records, train_size=40, eval_size=10, seed=3)
    b = split_and_sample(records, train_size=40, eval_size=10, seed=3)
    c = split_and_sample(records, train_size=40, eval_size=10, seed=4)
    assert [r.id for r in a.train] == [r.id for r in b.train] and len(a.train) == 40 and len(a.eval) == 10
    assert [r.id for r in a.train] != [r.id for r in c.train]


def test_short_pool_gives_what_it_has_and_says_so():
    split = split_and_sample(_records(n_persons=3, frames=5), train_size=100, eval_size=2, seed=0)
    assert len(split.train) < 100 and any("train: requested 100" in n for n in split.notes)


def test_class_caps_limit_each_class_share():
    records = _records(n_persons=10, frames=20)
    caps = parse_class_caps("Neutral=0.05,Anger=0.1")
    split = split_and_sample(records, train_size=100, eval_size=20, seed=0, caps=caps)
    counts = Counter(r.expression for r in split.train)
    assert counts["Neutral"] <= 5 and counts["Anger"] <= 10 and len(split.train) == 100


def test_class_cap_syntax_errors_are_clear():
    assert parse_class_caps("0.5") == {e: 0.5 for e in EXPRESSIONS}
    with pytest.raises(ValueError, match="unknown expression 'Joy'"):
        parse_class_caps("Joy=0.2")
    with pytest.raises(ValueError, match="0 < cap <= 1"):
        parse_class_caps("Neutral=3")


def test_rejected_frames_are_replaced_by_the_next_ones():
    records = _records()
    split = split_and_sample(records, train_size=40, eval_size=10, seed=0,
                             accept=lambda r: r.frame != 1)
    assert len(split.train) == 40 and all(r.frame != 1 for r in split.train) and split.rejected > 0


# -- the files ---------------------------------------------------------------------------------------

def test_train_and_eval_subjects_are_disjoint(built):
    train = {r["subject"] for r in load(built, "annotations.jsonl")}
    evals = {r["subject"] for r in load(built, "eval.json")}
    person = lambda s: s.removesuffix("_left").removesuffix("_right")  # noqa: E731
    assert train and evals and not {person(s) for s in train} & {person(s) for s in evals}
    report = load(built, "report.json")
    assert not set(report["split"]["train_persons"]) & set(report["split"]["eval_persons"])


def test_train_json_is_llava_conversation_format(built, tree):
    samples = load(built, "train.json")
    assert len(samples) == 3 * 30
    templates = load_templates()
    for sample in samples:
        kind = sample["id"].rsplit("-", 1)[1]
        human, gpt = sample["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert human["value"][len("<image>\n"):] in templates[kind]
        assert (tree / "cropped_aligned" / sample["image"]).is_file()
        assert not Path(sample["image"]).is_absolute()
    assert Counter(s["id"].rsplit("-", 1)[1] for s in samples) == {"summary": 30, "movement": 30, "reasoning": 30}


def test_summary_answers_start_with_the_expression(built):
    by_id = {a["id"]: a for a in load(built, "annotations.jsonl")}
    for sample in load(built, "train.json"):
        rid, kind = sample["id"].rsplit("-", 1)
        if kind == "summary":
            assert sample["conversations"][1]["value"].startswith(by_id[rid]["expression"] + ". ")


def test_annotations_match_their_labels(built):
    for row in load(built, "annotations.jsonl"):
        aus = {au: int(au in row["aus"]) for au in AUS}
        ann = Annotation(row["summary"], row["movement"], row["reasoning"])
        assert row["status"] == "validated" and validate_annotation(ann, row["expression"], aus) == []


def test_eval_json_holds_feabench_items(built, tree):
    items = load(built, "eval.json")
    assert len(items) == 8
    for item in items:
        assert set(item) >= {"id", "image", "expression", "aus", "subject"}
        assert item["expression"] in EXPRESSIONS and set(item["aus"]) <= set(AUS)
        assert (tree / "cropped_aligned" / item["image"]).is_file()


def test_eval_json_is_read_by_the_feabench_reader(built, tree):
    from feallm_llava.eval.readers import ReaderOptions, feabench

    result = feabench.read(built, ReaderOptions(image_folder=str(tree / "cropped_aligned")))
    assert len(result.records) == 8 and all(Path(r.image).is_file() for r in result.records)


def test_eval_json_names_its_image_folder_so_eval_needs_only_the_output_folder(built, tree):
    from feallm_llava.eval.readers import ReaderOptions, feabench

    assert {item["image_folder"] for item in load(built, "eval.json")} == {str((tree / "cropped_aligned").resolve())}
    result = feabench.read(built, ReaderOptions())  # no --image-folder
    assert len(result.records) == 8 and all(Path(r.image).is_file() for r in result.records)


def test_report_counts_classes_aus_and_skips(built):
    report = load(built, "report.json")
    train = report["counts"]["train"]
    assert train["images"] == 30 and train["samples"] == 90
    assert sum(train["expression"].values()) == 30 and set(train["aus"]) == {f"AU{a:02d}" for a in AUS}
    rows = load(built, "annotations.jsonl")
    assert train["aus"]["AU12"] == sum(12 in r["aus"] for r in rows)
    assert report["annotator"]["name"] == "template" and report["annotations"]["fallback"] == 0
    assert report["image_folder"].endswith("cropped_aligned")


def test_same_seed_rebuilds_identical_files(built, tree, tmp_path):
    assert build(tree, tmp_path) == 0
    for name in ("train.json", "eval.json", "annotations.jsonl"):
        assert (tmp_path / name).read_text() == (built / name).read_text()
    assert build(tree, tmp_path / "s1", "--seed", "1") == 0
    assert (tmp_path / "s1" / "train.json").read_text() != (built / "train.json").read_text()


def test_multi_turn_gives_one_conversation_per_image(tree, tmp_path):
    assert build(tree, tmp_path, "--multi-turn") == 0
    samples = load(tmp_path, "train.json")
    assert len(samples) == 30
    conv = samples[0]["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * 3
    assert conv[0]["value"].startswith("<image>\n")
    assert not any("<image>" in t["value"] for t in conv[1:])


def test_types_subset_for_the_instruction_ablation(tree, tmp_path, capsys):
    assert build(tree, tmp_path, "--types", "summary,reasoning") == 0
    kinds = Counter(s["id"].rsplit("-", 1)[1] for s in load(tmp_path, "train.json"))
    assert kinds == {"summary": 30, "reasoning": 30}
    capsys.readouterr()
    assert build(tree, tmp_path, "--types", "summary,gossip") == 2
    assert "must be one of" in capsys.readouterr().err


def test_fixed_wording_writes_one_text_per_label_set(tree, tmp_path):
    assert build(tree, tmp_path, "--wording", "fixed", "--types", "movement") == 0
    texts: dict[tuple, set] = {}
    for s in load(tmp_path, "train.json"):
        answer = s["conversations"][1]["value"]
        texts.setdefault(tuple(sorted(parse_aus(answer))), set()).add(answer)
    assert len(texts) > 1 and all(len(t) == 1 for t in texts.values()), texts
    assert load(tmp_path, "report.json")["annotator"]["wording"] == "fixed"


def test_absolute_image_paths_on_request(tree, tmp_path):
    assert build(tree, tmp_path, "--image-root-mode", "absolute") == 0
    assert all(Path(s["image"]).is_absolute() and Path(s["image"]).is_file() for s in load(tmp_path, "train.json"))


# -- what enters, and bad input ------------------------------------------------------------------------

def _small_tree(root: Path) -> Path:
    for k in range(4):
        write_video(root, "2022", f"p{k}", expr=[4, 7, -1, 0, 5], aus=[au_row({6, 12})] * 4 + [[-1] * 12])
    return root


def test_only_frames_with_both_valid_labels_enter(tmp_path):
    root = _small_tree(tmp_path / "aw2")
    assert build(root, tmp_path / "out", "--train-size", "6", "--eval-size", "2") == 0
    frames = {(r["id"]) for r in load(tmp_path / "out", "annotations.jsonl")} | {
        r["id"] for r in load(tmp_path / "out", "eval.json")}
    assert frames and all(f.endswith(("_00001", "_00004")) for f in frames)  # 2 valid frames per video
    skipped = load(tmp_path / "out", "report.json")["skipped"]
    assert skipped["expr_other"]["count"] == 4 and skipped["expr_invalid"]["count"] == 4
    assert skipped["au_invalid"]["count"] == 4


def test_unreadable_image_is_counted_and_replaced(tmp_path):
    root = _small_tree(tmp_path / "aw2")
    (root / "cropped_aligned" / "p0" / "00001.jpg").write_bytes(b"not a jpeg at all")
    assert build(root, tmp_path / "out", "--train-size", "6", "--eval-size", "1") == 1  # done, one item failed
    report = load(tmp_path / "out", "report.json")
    assert report["skipped"]["unreadable_image"]["count"] == 1
    assert "p0/00001.jpg" in report["skipped"]["unreadable_image"]["examples"][0]
    used = {r["image"] for r in load(tmp_path / "out", "annotations.jsonl") + load(tmp_path / "out", "eval.json")}
    assert "p0/00001.jpg" not in used


def test_bad_label_line_stops_with_file_and_line(tmp_path, capsys):
    root = _small_tree(tmp_path / "aw2")
    write_video(root, "2022", "p9", expr_lines=["0", "zero"])
    assert build(root, tmp_path / "out") == 2
    assert re.search(r"p9\.txt:3: non-numeric.*--skip-bad-lines", capsys.readouterr().err)
    assert build(root, tmp_path / "out", "--skip-bad-lines", "--train-size", "4", "--eval-size", "1") == 1
    assert load(tmp_path / "out", "report.json")["skipped"]["bad_label_line"]["count"] == 1


def test_2020_layout_alone_explains_that_12_aus_need_the_2022_layout(tmp_path, capsys):
    for k in range(3):
        write_video(tmp_path, "2020", f"p{k}", expr=[4], aus=[[0, 0, 0, 1, 1, 0, 0, 0]])
    assert build(tmp_path, tmp_path / "out") == 2
    assert re.search(r"2020 layout labels 8.*2022\+ layout", capsys.readouterr().err)


# -- the openai annotator through the command ---------------------------------------------------------

def test_openai_annotator_builds_the_same_files_with_tokens_in_the_report(tree, tmp_path):
    with start_fake_openai(good) as server:
        code = main(["build-dataset", "--root", str(tree), "--out", str(tmp_path), "--annotator", "openai",
                     "--base-url", server.base_url, "--train-size", "12", "--eval-size", "4",
                     "--concurrency", "4", "--no-progress"])
        assert server.requests.total == 12
    assert code == 0
    report = load(tmp_path, "report.json")
    stats = report["annotator"]["stats"]
    assert stats["validated"] == 12 and stats["fallback"] == 0 and stats["prompt_tokens"] > 0
    assert stats["cost_usd"] > 0 and report["annotator"]["fallback_ids"] == []
    assert all(r["annotator"] == "openai" for r in load(tmp_path, "annotations.jsonl"))


def test_batch_write_mode_writes_the_request_file_and_nothing_else(tree, tmp_path):
    code = main(["build-dataset", "--root", str(tree), "--out", str(tmp_path), "--annotator", "openai",
                 "--base-url", "http://127.0.0.1:9/v1", "--batch", "write", "--train-size", "5",
                 "--eval-size", "2", "--no-progress"])
    assert code == 0
    lines = (tmp_path / "batch" / "batch_input_000.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["url"] == "/v1/chat/completions"
    assert not (tmp_path / "train.json").exists()


def test_batch_submit_then_collect_builds_without_sending_requests_twice(tree, tmp_path):
    def cli(mode):
        return main(["build-dataset", "--root", str(tree), "--out", str(tmp_path), "--annotator", "openai",
                     "--base-url", server.base_url, "--batch", mode, "--train-size", "6",
                     "--eval-size", "2", "--no-progress"])

    with start_fake_openai(good) as server:
        assert cli("submit") == 0
        state = load(tmp_path / "batch", "state.json")
        assert len(state["batches"]) == 1 and not (tmp_path / "train.json").exists()
        assert cli("collect") == 0
        assert server.requests.total == 6 and all(e.batch for e in server.requests.entries())
    report = load(tmp_path, "report.json")
    assert report["annotator"]["stats"]["from_cache"] == 6 and report["annotations"]["validated"] == 6
    assert len(load(tmp_path, "train.json")) == 18


def test_openai_without_key_or_base_url_is_a_clear_error(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert build(tree, tmp_path, "--annotator", "openai") == 2
    assert "needs an API key" in capsys.readouterr().err


# -- upstream LLaVA reads train.json ------------------------------------------------------------------

@pytest.mark.parametrize("multi_turn", [False, True])
def test_train_json_loads_through_llava_lazy_supervised_dataset(kit, tree, tmp_path, monkeypatch, multi_turn):
    import torch
    from transformers import CLIPImageProcessor

    import feallm_llava  # noqa: F401 - arms the compat shims llava.train needs on this stack
    from feallm_llava.tinykit import load_tokenizer
    from llava import conversation
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.train.train import DataArguments, DataCollatorForSupervisedDataset, LazySupervisedDataset

    extra = ["--multi-turn"] if multi_turn else []
    assert build(tree, tmp_path, "--train-size", "4", "--eval-size", "2", *extra) == 0
    # As llava.train.train.train() sets them for `--version v1` with an image tower.
    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates["v1"])
    tokenizer = load_tokenizer(kit.tokenizer)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.model_max_length = 2048
    data_args = DataArguments(data_path=str(tmp_path / "train.json"), lazy_preprocess=True, is_multimodal=True,
                              image_folder=str(tree / "cropped_aligned"), image_aspect_ratio="pad")
    data_args.image_processor = CLIPImageProcessor.from_pretrained(kit.clip)
    data_args.mm_use_im_start_end = False
    dataset = LazySupervisedDataset(str(tmp_path / "train.json"), tokenizer, data_args)
    assert len(dataset) == (4 if multi_turn else 12)

    batch = DataCollatorForSupervisedDataset(tokenizer)([dataset[i] for i in range(4)])
    size = kit.spec.image_size
    assert batch["images"].shape == (4, 3, size, size)
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(dim=1).tolist() == [1, 1, 1, 1]
    supervised = batch["labels"] != IGNORE_INDEX
    assert supervised.any(dim=1).all()  # every sample trains on its answer (no tokenization mismatch)
    first = dataset[0]
    answer_ids = first["labels"][first["labels"] != IGNORE_INDEX]
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    sample = json.loads((tmp_path / "train.json").read_text())[0]
    assert sample["conversations"][1]["value"].split(".")[0] in text
    assert torch.isfinite(batch["images"]).all()
