"""Caption processing (kohya_anima.md §2.2 / §2.3): each key's effect, the order, determinism, config checks.

Expected strings are worked out by hand from the rules, with a scripted RNG: `random()` and `choice()`
answer from lists given per case (an unexpected or missing draw fails the test), `shuffle()` reverses.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from anima_trainer.data import (
    CaptionParams,
    DatasetConfigError,
    build_dataset,
    parse_dataset_config,
    process_caption,
    resolve_datasets,
)


class ScriptedRng:
    def __init__(self, randoms=(), choices=()):
        self.randoms, self.choices = list(randoms), list(choices)

    def random(self) -> float:
        assert self.randoms, "unexpected random() draw"
        return self.randoms.pop(0)

    def choice(self, seq):
        assert self.choices, f"unexpected choice() among {seq}"
        return seq[self.choices.pop(0)]

    def shuffle(self, x) -> None:
        x.reverse()


KTS = {"keep_tokens_separator": "|||"}
SH = {"shuffle_caption": True}
WC = {"enable_wildcard": True}

# id, raw caption, CaptionParams fields, random() answers, choice() indices, call kwargs, expected
CASES = [
    ("defaults leave the text alone", "a, b,c", {}, [], [], {}, "a, b,c"),
    ("prefix joined with a space", "a, b", {"caption_prefix": "sks"}, [], [], {}, "sks a, b"),
    ("suffix joined with a space", "a, b", {"caption_suffix": "best"}, [], [], {}, "a, b best"),
    ("prefix and suffix", "a, b", {"caption_prefix": "sks", "caption_suffix": "best"}, [], [], {}, "sks a, b best"),
    ("empty prefix means none", "a, b", {"caption_prefix": ""}, [], [], {}, "a, b"),
    ("shuffle re-joins with ', '", "a, b ,c", SH, [], [], {}, "c, b, a"),
    ("empty tags dropped", "a, b,", SH, [], [], {}, "b, a"),
    ("caption_separator splits, join stays ', '", "a; b; c", {**SH, "caption_separator": ";"}, [], [], {},
     "c, b, a"),
    ("caption_separator alone changes nothing", "a; b", {"caption_separator": ";"}, [], [], {}, "a; b"),
    ("keep_tokens fixes the first tags", "a, b, c, d", {**SH, "keep_tokens": 2}, [], [], {}, "a, b, d, c"),
    ("keep_tokens alone changes nothing", "a, b, c", {"keep_tokens": 1}, [], [], {}, "a, b, c"),
    # prefix/suffix are added first and then are ordinary tags: shuffled unless protected
    ("prefix tags are shuffled", "a, b", {**SH, "caption_prefix": "sks,"}, [], [], {}, "b, a, sks"),
    ("prefix without comma fuses with the first tag", "a, b", {**SH, "caption_prefix": "sks"}, [], [], {},
     "b, sks a"),
    ("prefix protected by keep_tokens", "a, b, c", {**SH, "caption_prefix": "sks,", "keep_tokens": 1}, [], [], {},
     "sks, c, b, a"),
    ("prefix/suffix protected by |||", "a, b, c",
     {**SH, **KTS, "caption_prefix": "sks |||", "caption_suffix": "||| masterpiece"}, [], [], {},
     "sks, c, b, a, masterpiece"),
    ("||| twice: fixed head and fixed tail", "1girl, miku ||| stage, mic, smile ||| best quality, rating: general",
     {**SH, **KTS}, [], [], {}, "1girl, miku, smile, mic, stage, best quality, rating: general"),
    ("||| once: fixed head only", "x, y ||| a, b", {**SH, **KTS}, [], [], {}, "x, y, b, a"),
    ("||| overrides keep_tokens", "a, b ||| c, d", {**SH, **KTS, "keep_tokens": 1}, [], [], {}, "a, b, d, c"),
    ("no ||| in the caption: keep_tokens applies", "a, b, c", {**SH, **KTS, "keep_tokens": 1}, [], [], {},
     "a, c, b"),
    ("||| markers removed without shuffle", "1girl|||a,b", KTS, [], [], {}, "1girl, a, b"),
    ("caption dropout: draw < rate drops", "a, b", {"caption_dropout_rate": 0.5}, [0.4], [], {}, ""),
    ("caption dropout: draw >= rate keeps", "a, b", {"caption_dropout_rate": 0.5}, [0.5], [], {}, "a, b"),
    ("dropout comes before the line choice", "l1\nl2", {**WC, "caption_dropout_rate": 0.5}, [0.1], [], {}, ""),
    ("every 2nd epoch: epoch index 1 is the 2nd", "a, b", {"caption_dropout_every_n_epochs": 2}, [], [],
     {"epoch": 1}, ""),
    ("every 2nd epoch: epoch index 0 kept", "a, b", {"caption_dropout_every_n_epochs": 2}, [], [],
     {"epoch": 0}, "a, b"),
    ("rate drawn even in a dropped epoch", "a, b",
     {"caption_dropout_rate": 0.5, "caption_dropout_every_n_epochs": 3}, [0.9], [], {"epoch": 2}, ""),
    ("tag dropout: draw < rate drops the tag", "a, b, c", {"caption_tag_dropout_rate": 0.5}, [0.1, 0.9, 0.5], [],
     {}, "b, c"),
    ("tag dropout re-joins", "a,b", {"caption_tag_dropout_rate": 0.5}, [0.9, 0.9], [], {}, "a, b"),
    ("tag dropout spares keep_tokens", "k, a, b", {"caption_tag_dropout_rate": 0.5, "keep_tokens": 1},
     [0.1, 0.9], [], {}, "k, b"),
    ("tag dropout spares ||| parts", "k ||| a, b ||| z", {**KTS, "caption_tag_dropout_rate": 0.5}, [0.9, 0.1], [],
     {}, "k, a, z"),
    ("shuffle before tag dropout", "a, b, c", {**SH, "caption_tag_dropout_rate": 0.5}, [0.1, 0.9, 0.9], [], {},
     "b, a"),
    # warmup over flexible tags [a, b, c, d]: floor(step * (4 - min) / 10) + min of them while step < 10
    ("warmup step 0 keeps token_warmup_min", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 10}, [], [],
     {"step": 0}, "k, a"),
    ("warmup step 5", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 10}, [], [], {"step": 5}, "k, a, b"),
    ("warmup step 9", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 10}, [], [], {"step": 9},
     "k, a, b, c"),
    ("warmup over at step 10", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 10}, [], [], {"step": 10},
     "k, a, b, c, d"),
    ("token_warmup_min", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 10, "token_warmup_min": 3}, [],
     [], {"step": 0}, "k, a, b, c"),
    ("fractional warmup = share of max_train_steps", "k, a, b, c, d", {"keep_tokens": 1, "token_warmup_step": 0.5},
     [], [], {"step": 5, "max_train_steps": 20}, "k, a, b"),
    ("warmup truncates before the shuffle", "k, a, b, c, d", {**SH, "keep_tokens": 1, "token_warmup_step": 10}, [],
     [], {"step": 5}, "k, b, a"),
    ("secondary separator becomes caption_separator", "a, sky;;;cloud;;;day, b", {"secondary_separator": ";;;"}, [],
     [], {}, "a, sky,cloud,day, b"),
    ("secondary group is one tag for the shuffle", "a, sky;;;cloud, b", {**SH, "secondary_separator": ";;;"}, [],
     [], {}, "b, sky,cloud, a"),
    ("secondary separator -> custom caption_separator", "a; x::y", {"secondary_separator": "::",
                                                                     "caption_separator": ";"}, [], [], {}, "a; x;y"),
    ("wildcard picks one alternative", "1girl, {simple|white} background", WC, [], [1], {},
     "1girl, white background"),
    ("one draw per wildcard, left to right", "{a|b}, {c|d|e}", WC, [], [0, 2], {}, "a, e"),
    ("{{ }} are literal braces", "{{retro style}}, {x|y}", WC, [], [1], {}, "{retro style}, y"),
    ("wildcards off: braces literal, first line only", "{a|b}\nsecond", {}, [], [], {}, "{a|b}"),
    ("multi-line: one random line", "l1\nl2\nl3", WC, [], [2], {}, "l3"),
    ("single line: no line draw", "a, b", WC, [], [], {}, "a, b"),
    ("prefix/suffix go on the chosen line", "l1\nl2", {**WC, "caption_prefix": "sks", "caption_suffix": "end"}, [],
     [1], {}, "sks l2 end"),
    ("wildcards in the prefix expand", "a", {**WC, "caption_prefix": "{x|y}"}, [], [1], {}, "y a"),
    # dropout kept (0.5) -> line 2 -> red -> fixed [sks] flex [red hair, smile, sky;;;cloud] fixed [best]
    # -> reversed -> tag draws 0.9 keep, 0.2 drop smile, 0.9 keep -> join -> ;;; to ,
    ("all steps in order", "l1\n{red|blue} hair, smile, sky;;;cloud",
     {**WC, **SH, **KTS, "caption_prefix": "sks |||", "caption_suffix": "||| best", "secondary_separator": ";;;",
      "caption_tag_dropout_rate": 0.5, "caption_dropout_rate": 0.1},
     [0.5, 0.9, 0.2, 0.9], [1, 0], {}, "sks, sky,cloud, red hair, best"),
]


@pytest.mark.parametrize("raw, fields, randoms, choices, kwargs, expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_process_caption(raw, fields, randoms, choices, kwargs, expected):
    rng = ScriptedRng(randoms, choices)
    kwargs = {"epoch": 0, **kwargs}
    assert process_caption(raw, CaptionParams(**fields), rng=rng, **kwargs) == expected
    assert rng.randoms == [] and rng.choices == [], "scripted draws left unused"


def test_real_rng_is_deterministic_and_only_reorders():
    params = CaptionParams(shuffle_caption=True, keep_tokens=1)
    raw = "sks, " + ", ".join(f"tag{i}" for i in range(12))
    first = process_caption(raw, params, rng=random.Random("x"), epoch=0)
    assert first == process_caption(raw, params, rng=random.Random("x"), epoch=0)
    assert first.startswith("sks, ") and sorted(first.split(", ")) == sorted(raw.split(", "))


def test_fractional_warmup_needs_max_train_steps():
    with pytest.raises(ValueError, match="fraction of max_train_steps"):
        process_caption("a, b", CaptionParams(token_warmup_step=0.5), rng=ScriptedRng(), epoch=0, step=1)


def test_is_static():
    assert CaptionParams(caption_prefix="sks", keep_tokens_separator="|||", secondary_separator=";;;").is_static
    for fields in ({"shuffle_caption": True}, {"enable_wildcard": True}, {"caption_dropout_rate": 0.1},
                   {"caption_dropout_every_n_epochs": 3}, {"caption_tag_dropout_rate": 0.1},
                   {"token_warmup_step": 5}):
        assert not CaptionParams(**fields).is_static, fields


# --- config -----------------------------------------------------------------------------------------------

def _cfg(general=None, dataset=None, subset=None):
    return {"general": general or {},
            "datasets": [{"resolution": 64, **(dataset or {}), "subsets": [{"image_dir": "x", **(subset or {})}]}]}


def test_caption_keys_precedence_and_defaults():
    raw = {
        "general": {"resolution": 64, "shuffle_caption": True, "caption_prefix": "g", "caption_dropout_rate": 0},
        "datasets": [{"caption_prefix": "d", "keep_tokens": 2, "subsets": [
            {"image_dir": "a", "caption_prefix": "", "caption_tag_dropout_rate": 1},
            {"image_dir": "b", "keep_tokens_separator": "|||", "token_warmup_step": 0.25},
        ]}],
    }
    (ds,) = resolve_datasets(parse_dataset_config(raw))
    a, b = ds.subsets[0].caption, ds.subsets[1].caption
    assert (a.caption_prefix, a.shuffle_caption, a.keep_tokens, a.caption_tag_dropout_rate) == ("", True, 2, 1.0)
    assert (b.caption_prefix, b.keep_tokens_separator, b.token_warmup_step) == ("d", "|||", 0.25)
    assert b.caption_dropout_rate == 0.0 and isinstance(b.caption_dropout_rate, float)
    # kohya's defaults for everything not set
    assert (b.caption_separator, b.token_warmup_min, b.caption_dropout_every_n_epochs, b.enable_wildcard,
            b.secondary_separator, b.caption_suffix) == (",", 1, 0, False, None, None)


@pytest.mark.parametrize(
    "raw, message",
    [
        (_cfg(general={"caption_dropout_rate": -0.1}),
         r"^dataset option 'caption_dropout_rate' in \[general\]: must be a probability between 0 and 1, got -0.1$"),
        (_cfg(subset={"caption_tag_dropout_rate": 1.5}),
         (r"'caption_tag_dropout_rate' in \[\[datasets\]\] #1 > \[\[datasets.subsets\]\] #1: must be a probability"
          r" between 0 and 1, got 1.5")),
        (_cfg(dataset={"caption_dropout_rate": "0.1"}),
         r"'caption_dropout_rate' in \[\[datasets\]\] #1: expected a number, got str '0.1'"),
        (_cfg(general={"caption_tag_dropout_rate": True}), "'caption_tag_dropout_rate' .*expected a number, got bool"),
        (_cfg(general={"keep_tokens": -1}), r"'keep_tokens' in \[general\]: .*greater than or equal to 0"),
        (_cfg(general={"keep_tokens": 1.5}), r"'keep_tokens' in \[general\]: .*got float 1.5"),
        (_cfg(subset={"caption_dropout_every_n_epochs": -2}),
         "'caption_dropout_every_n_epochs' .*greater than or equal to 0"),
        (_cfg(general={"token_warmup_min": -1}), "'token_warmup_min' .*greater than or equal to 0"),
        (_cfg(general={"token_warmup_step": -1}), "'token_warmup_step' in \\[general\\]: must be >= 0"),
        (_cfg(general={"caption_separator": ""}), "'caption_separator' in \\[general\\]: must not be empty"),
        (_cfg(general={"shuffle_caption": "yes"}), r"'shuffle_caption' in \[general\].*got str 'yes'"),
        (_cfg(general={"enable_wildcard": 1}), r"'enable_wildcard' in \[general\].*got int 1"),
        (_cfg(general={"caption_prefix": 3}), r"'caption_prefix' in \[general\].*got int 3"),
        (_cfg(general={"caption_dropout": 0.1}), "did you mean 'caption_dropout_rate'"),
    ],
)
def test_caption_config_errors(raw, message):
    with pytest.raises(DatasetConfigError, match=message):
        parse_dataset_config(raw)


@pytest.mark.parametrize(
    "subset, message",
    [
        ({"keep_tokens_separator": ","}, "keep_tokens_separator must differ from caption_separator"),
        ({"caption_separator": ";", "secondary_separator": ";"}, "secondary_separator must differ"),
    ],
)
def test_caption_resolve_errors(subset, message):
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets.subsets\]\] #1: " + message):
        resolve_datasets(parse_dataset_config(_cfg(subset=subset)))


# --- the dataset ------------------------------------------------------------------------------------------

TAGS = ", ".join(f"tag{i}" for i in range(10))


def _project(tmp_path: Path, captions: dict[str, str], **subset) -> dict:
    folder = tmp_path / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (stem, text) in enumerate(captions.items()):
        Image.new("RGB", (64, 64), (40 * k, 0, 0)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return {"general": {"resolution": 64, "batch_size": 2, "caption_extension": ".txt"},
            "datasets": [{"subsets": [{"image_dir": str(folder), **subset}]}]}


def test_dataset_captions_deterministic_per_seed_and_epoch(tmp_path):
    raw = _project(tmp_path, {"a": TAGS, "b": TAGS, "c": TAGS}, shuffle_caption=True, keep_tokens=1, num_repeats=3)
    cfg = parse_dataset_config(raw)
    ds = build_dataset(cfg, seed=5)
    assert all(item.caption == TAGS for item in ds.items)  # raw stays on the item
    caps = [ds.epoch_captions(e) for e in range(3)]
    assert [build_dataset(cfg, seed=5).epoch_captions(e) for e in range(3)] == caps
    assert caps[0] != caps[1] != caps[2]
    assert build_dataset(cfg, seed=6).epoch_captions(0) != caps[0]
    flat = [c for row in caps[0] for c in row]
    assert all(c.startswith("tag0, ") and sorted(c.split(", ")) == sorted(TAGS.split(", ")) for c in flat)
    # the three repeats of an image are processed independently
    plan = ds.batch_plan(0)
    per_item: dict[int, list[str]] = {}
    for indices, row in zip(plan, caps[0]):
        for i, c in zip(indices, row):
            per_item.setdefault(i, []).append(c)
    assert all(len(set(v)) > 1 for v in per_item.values())
    # Batch.captions == epoch_captions == caption_for (what a latent-cache trainer calls), with or without prefetch
    for prefetch in (0, 2):
        assert [b.captions for b in ds.epoch(1, prefetch=prefetch)] == caps[1]
    seen: dict[int, int] = {}
    for k, indices in enumerate(ds.batch_plan(2)):
        for i, c in zip(indices, caps[2][k]):
            assert ds.caption_for(i, 2, ds.step_at(2, k), occurrence=seen.get(i, 0)) == c
            seen[i] = seen.get(i, 0) + 1


def test_dataset_dropout_every_n_epochs(tmp_path):
    ds = build_dataset(parse_dataset_config(_project(tmp_path, {"a": "x, y", "b": "z"},
                                                     caption_dropout_every_n_epochs=2)))
    assert ds.captions_are_static is False
    for epoch in range(4):
        flat = {c for row in ds.epoch_captions(epoch) for c in row}
        assert flat == ({""} if epoch % 2 == 1 else {"x, y", "z"}), epoch


def test_dataset_wildcard_reads_all_lines_and_picks_one(tmp_path):
    text = "line one\n\n  line {a|b}  \nline three\n"
    ds = build_dataset(parse_dataset_config(_project(tmp_path, {"a": text}, enable_wildcard=True)))
    assert ds.items[0].caption == "line one\nline {a|b}\nline three"
    chosen = {ds.caption_for(0, epoch) for epoch in range(40)}
    assert chosen == {"line one", "line a", "line b", "line three"}
    plain = build_dataset(parse_dataset_config(_project(tmp_path / "plain", {"p": text})))
    assert plain.items[0].caption == "line one"  # kohya: first line when wildcards are off
    assert plain.captions_are_static and plain.caption_for(0, 3) == "line one"


def test_dataset_token_warmup_steps(tmp_path):
    ds = build_dataset(parse_dataset_config(_project(tmp_path, {"a": "k, a, b, c, d"}, keep_tokens=1,
                                                     token_warmup_step=0.5)))
    with pytest.raises(ValueError, match="max_train_steps"):
        ds.caption_for(0, 0, step=1)
    ds.max_train_steps = 20  # warmup over 10 steps
    assert ds.caption_for(0, 0, step=5) == "k, a, b"
    ds.gradient_accumulation_steps = 2
    assert len(ds) == 1 and ds.step_at(9, 0) == 4 and ds.step_at(10, 0) == 5
    assert ds.epoch_captions(10) == [["k, a, b"]]


def test_load_batch_captions(tmp_path):
    ds = build_dataset(parse_dataset_config(_project(tmp_path, {"a": "x, y"}, caption_prefix="sks,",
                                                     token_warmup_step=0.5)))
    assert ds.load_batch([0]).captions == ["x, y"]  # raw: pixels-only callers need no max_train_steps
    assert ds.load_batch([0], captions=["given"]).captions == ["given"]
    ds.max_train_steps = 10
    # step 0 of a 5-step warmup: token_warmup_min = 1 tag of the 3
    assert ds.load_batch([0], epoch=3).captions == [ds.caption_for(0, 3)] == ["sks"]
    assert ds.caption_for(0, 3, step=5) == "sks, x, y"
