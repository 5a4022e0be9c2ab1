"""Property-based fuzzing of the training-config loader (issue 9): any TOML document given as `--config_file`,
and any list of command-line tokens, yields a TrainConfig or a ConfigError, never another exception.

Documents mix the real TrainConfig field names (and kohya / sd-scripts-anima aliases and unimplemented options)
with junk keys, in top-level keys and tables, with values of every TOML type: nested tables and arrays, dates
and times, huge integers, NaN / inf, empty and unicode strings, and plausible values per field (its choices,
edge numbers, `key=value` lists) so that the cross-field rules are reached too.  Bounded and derandomised so
that CI is stable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from anima_trainer.config import ConfigError, TrainConfig, parse_train_args
from anima_trainer.config import kohya_options as ko

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIELDS = list(TrainConfig.model_fields)
NAMES = sorted({*FIELDS, *ko.ALIASES, *ko.RULES, "config_file"})
REQUIRED = {"pretrained_model_name_or_path": "dit.safetensors", "qwen3": "qwen3.safetensors",
            "vae": "vae.safetensors", "output_dir": "out", "dataset_config": "dataset.toml"}

# --- values --------------------------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=16)  # TOML strings are Unicode
EDGE_NUMBERS = [0, 1, -1, 2, 3, 7, 100, 100000, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30, 0.0, -0.0, 0.5, 0.999,
                1.0, 1.5, 1e-4, -1e-4, 1e-300, 1e300, math.inf, -math.inf, math.nan]
ODD_STRINGS = ["", " ", "true", "false", "none", "None", "0", "-1", "1e-4", "nan", "inf", "10%", "50%", "x.y", ".x",
               "..", "x.", ".", "torch", "torch.optim", "torch.optim.SGD", "torch.optim.lr_scheduler.StepLR",
               "CosineAnnealingLR", "ReduceLROnPlateau", "StepLR", "LambdaLR", "latest", "~", "a=b",
               "\u00e9\u00e8", "\u2603", "\U0001f600", "a\nb", "\t", "\\", '"', "networks.lora_anima",
               "networks.lokr", "lycoris.kohya", "lion", "AdaFactor", "prodigy", "dadaptation"]
KV_ITEMS = ["a=1", "x", "=", "=1", "a=b=c", "algo=lokr", "algo=loha", "algo=lora", "train_llm_adapter=True",
            "train_norm=true", "factor=4", "full_matrix=On", "dora_wd=True", "rank_dropout=0.1", "module_dropout=2",
            "network_reg_dims=.*=x", "network_reg_lrs=.*=0", "loraplus_lr_ratio=-1", "include_patterns=[",
            "exclude_patterns=['.*']", "weight_decay=0.01", "betas=(0.9,0.99)", "relative_step=False",
            "relative_step=True", "scale_parameter=False", "warmup_init=True", "warmup_steps=5", "decouple=True",
            "d_coef=0", "lr=1", "eps=nan", "T_max=10", "step_size=2", "gamma=0.5", "step_rules=1:100,0.1",
            "step_rules=x", "step_rules=1:0,0.1:0", "verbose=yes"]

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.sampled_from(ODD_STRINGS),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.datetimes(timezones=st.just(dt.timezone.utc)),
    st.dates(),
    st.times(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.one_of(text, st.sampled_from(NAMES)), inner, max_size=3), max_leaves=8)


def _choices(annotation: Any) -> list[Any]:
    """The Literal values inside an annotation (also in `X | None`)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [c for a in get_args(annotation) for c in _choices(a)]


def field_values(name: str, junk: bool = True) -> st.SearchStrategy[Any]:
    """Values likely to get past the type check of `name`, so the range and cross-field rules are reached; with
    `junk`, also odd strings and (1 in 5) any value at all."""
    if name not in TrainConfig.model_fields:
        return values
    annotation = TrainConfig.model_fields[name].annotation
    kinds = str(annotation)
    options: list[st.SearchStrategy[Any]] = [st.sampled_from(ODD_STRINGS)] if junk else []
    if choices := _choices(annotation):
        options.append(st.sampled_from(choices))
    if "bool" in kinds:
        options.append(st.booleans())
    if "int" in kinds or "float" in kinds:
        options += [st.sampled_from(EDGE_NUMBERS), st.integers(-3, 20), st.floats(-2, 2)]
    if "dict" in kinds:
        options.append(st.lists(st.sampled_from(KV_ITEMS), max_size=4))
    if name == "optimizer_type":
        options.append(st.sampled_from([*ko.KOHYA_OPTIMIZERS, *ko.OPTIMIZER_ALIASES, "torch.optim.SGD", "Adam8bit",
                                        "SGD", ".Adam", "..Adam", ".x.Adam", "torch.optim.", "os.path",
                                        "torch.nn.Linear"]))
    if name == "lr_scheduler_type":
        options.append(st.sampled_from(["StepLR", "CosineAnnealingLR", "torch.optim.lr_scheduler.LambdaLR",
                                        "ReduceLROnPlateau", ".StepLR", "..", ".x.StepLR", "x.",
                                        "torch.optim.lr_scheduler.",
                                        "math.sqrt"]))
    if name in ("network_module", "anima_timestep_sampling"):
        options.append(st.sampled_from(["networks.lora_anima", "networks.lokr", "networks.loha", "lycoris.kohya",
                                        "logit_normal", "uniform", "lora", "x"]))
    if "Path" in kinds or name == "resume":
        options.append(st.sampled_from(["", "x", "~/x", ".", "latest", "a/../b"]))
    if not options:  # a plain string (output_name, log_prefix, ...)
        options.append(st.sampled_from(["x", "run-1", "\u00e9t\u00e9"]))
    likely = st.one_of(*options)
    return st.integers(0, 4).flatmap(lambda i: values if i == 0 and junk else likely)


keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.sampled_from(NAMES),
                 text)


@st.composite
def key_values(draw, max_size: int) -> dict[str, Any]:
    return {k: draw(field_values(k)) for k in draw(st.lists(keys, max_size=max_size, unique=True))}


@st.composite
def documents(draw) -> dict[str, Any]:
    """A TOML document as a dict: top-level keys, and tables of keys (the loader flattens one level).  Two in
    three are plausible (the required settings and real options with values of their type), so that range and
    cross-field rules are reached; the others mix in junk keys, junk values and nested tables."""
    if draw(st.integers(0, 2)):
        names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=6, unique=True))
        doc = {**REQUIRED, **{k: draw(field_values(k, junk=False)) for k in names}}
        return {"training": doc} if draw(st.booleans()) else doc
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 3)):
        doc.update(REQUIRED)  # valid required settings: the other keys' own rules are what is tested
    doc.update(draw(key_values(6)))
    tables = st.one_of(st.sampled_from(["model", "training", "network", "optimizer"]), text)
    for table in draw(st.lists(tables, max_size=2, unique=True)):
        if table not in doc:
            doc[table] = draw(key_values(5))
    return doc


# --- TOML writing ---------------------------------------------------------------------------------------------

def toml_string(s: str) -> str:
    # JSON escapes are TOML escapes; DEL is a control character in TOML but not in JSON
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_document(doc: dict[str, Any]) -> str:
    top = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f"[{toml_string(k)}]\n" + "".join(f"{toml_string(kk)} = {toml_value(vv)}\n" for kk, vv in v.items())
              for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables)


def parse_or_config_error(argv: list[str]) -> TrainConfig | ConfigError | str:
    """parse_train_args' result; a ConfigError is returned (with a message), anything else propagates.  `-h` /
    `--help` print the help and exit 0 (argparse's SystemExit): the printed help is returned."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cfg = parse_train_args(argv)
    except ConfigError as e:
        assert str(e).strip(), "a ConfigError without a message"
        return e
    except SystemExit as e:
        assert e.code == 0 and ("-h" in argv or "--help" in argv), (e.code, argv)
        assert out.getvalue().startswith("usage: anima-trainer train "), out.getvalue()[:200]
        return out.getvalue()
    assert isinstance(cfg, TrainConfig)
    return cfg


# --- properties -------------------------------------------------------------------------------------------------

@FUZZ
@given(doc=documents())
def test_any_toml_document_gives_config_or_config_error(doc):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.toml"
        path.write_text(toml_document(doc), encoding="utf-8")
        parse_or_config_error(["--config_file", str(path)])


@FUZZ
@given(data=st.binary(max_size=200) | text.map(lambda s: s.encode("utf-8")))
def test_any_bytes_as_toml_give_config_or_config_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.toml"
        path.write_bytes(data)
        parse_or_config_error(["--config_file", str(path)])


FLAG_TOKENS = [f"--{n}" for n in NAMES] + [f"--no-{n}" for n in FIELDS] + ["--", "-", "-x", "--=", "--no-",
                                                                         "-h", "--help"]


@st.composite
def command_lines(draw) -> list[str]:
    tokens: list[str] = []
    if draw(st.integers(0, 3)):
        for k, v in REQUIRED.items():
            tokens += [f"--{k}", v]
    for _ in range(draw(st.integers(0, 6))):
        flag = draw(st.one_of(st.sampled_from([f"--{n}" for n in FIELDS]), st.sampled_from(FLAG_TOKENS), text))
        tokens.append(flag)
        name = flag.removeprefix("--")
        value = draw(field_values(name).filter(lambda v: not isinstance(v, (list, dict))).map(toml_value)
                     | st.sampled_from(ODD_STRINGS) | text)
        if draw(st.booleans()):
            tokens.append(value)
        elif draw(st.booleans()):
            tokens[-1] = f"{flag}={value}"
        if name in ("network_args", "optimizer_args", "lr_scheduler_args"):
            tokens += draw(st.lists(st.sampled_from(KV_ITEMS), max_size=3))
    return tokens


REQUIRED_ARGV = [t for k, v in REQUIRED.items() for t in (f"--{k}", v)]


@FUZZ
@given(argv=command_lines())
@example(argv=["--config_file", ""])  # found by this test: Path("").with_name raised ValueError
@example(argv=[*REQUIRED_ARGV, "--lr_scheduler_type", ".."])  # found by this test: importlib's TypeError
@example(argv=[*REQUIRED_ARGV, "--optimizer_type", "..Adam"])
@example(argv=[*REQUIRED_ARGV, "--optimizer_type", ".x.Adam"])
@example(argv=["--help"])  # issue 13: a % in a setting's description crashed the help
@example(argv=[*REQUIRED_ARGV, "--vram_budget_gb", "auto", "-h"])
def test_any_command_line_gives_config_or_config_error(argv):
    parse_or_config_error(argv)


def test_the_fuzzers_reach_valid_configs_and_cross_field_rules():
    """The strategies are not all rejected at the first check: fixed examples of what they generate."""
    doc = {**REQUIRED, "training": {"optimizer_type": "AdaFactor", "optimizer_args": ["relative_step=True"]}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.toml"
        path.write_text(toml_document(doc), encoding="utf-8")
        assert parse_or_config_error(["--config_file", str(path)]).lr_scheduler == "adafactor"
        path.write_text(toml_document({**REQUIRED, "lr_scheduler": "cosine", "optimizer_type": "RAdamScheduleFree",
                                       "when": dt.date(2020, 1, 1)}), encoding="utf-8")
        err = parse_or_config_error(["--config_file", str(path)])
        assert isinstance(err, ConfigError) and "unknown key 'when'" in str(err)
