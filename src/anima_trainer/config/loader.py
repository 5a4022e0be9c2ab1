"""Command line + `--config_file` TOML → `TrainConfig`, with kohya's precedence: command line > TOML > defaults.

TOML semantics follow kohya's `read_config_from_file` (kohya_anima.md §1.5): `.toml` is appended to the path when
the path as given does not exist; every top-level table is flattened (table names are cosmetic, top-level keys are
allowed too), list options are TOML arrays.  Stricter than kohya: a key in two tables, an unknown key and a value
of the wrong type are errors (kohya silently overwrites / accepts them).  Every kohya / sd-scripts-anima option is
either a TrainConfig field, an alias of one (kohya_options.ALIASES; kohya's switches such as fp8_base_unet turn
their settings on), or a rule of kohya_options.RULES: accepted with one start-up notice (what happens instead;
`TrainConfig.notices`), or refused where honouring is impossible and ignoring would change the result.
Errors name the file and line of the key (tomllib gives no positions: the key is found in the file text).
Relative paths in the TOML are relative to the current working directory, as in kohya (not to the TOML's folder).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticUndefined

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.config.output_config import write_output_config
from anima_trainer.config.root_schema import root_style_evidence
from anima_trainer.config.schedule_rules import schedule_notices
from anima_trainer.config.train import TrainConfig, make_train_config

_LIST_FIELDS = ("network_args", "optimizer_args", "lr_scheduler_args")
_LIST_VALUE_FIELDS = ("base_weights", "base_weights_multiplier", "text_encoder_lr", "trainable_patterns")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


def _field_names() -> list[str]:
    return list(TrainConfig.model_fields)


def help_escape(text: str) -> str:
    """argparse %-formats every help string (for `%(default)s`): text taken from elsewhere (Field descriptions,
    kohya's option tables) must have its `%` doubled, or `--help` crashes on e.g. "92 % of the card"."""
    return text.replace("%", "%%")


_BOOL_OR_AUTO = bool | Literal["auto"]


def _add(parser: argparse.ArgumentParser, flag: str, field: str, help_text: str) -> None:
    info = TrainConfig.model_fields[field]
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_escape(help_text), "dest": flag}
    if info.annotation in (bool, bool | None, _BOOL_OR_AUTO):  # `--flag` is true; `--flag=false`, `--flag false`,
        # `--no-flag`: false (compile_blocks also takes `auto`)
        kw.update(nargs="?", const="true", metavar="{true,false,auto}" if info.annotation == _BOOL_OR_AUTO else "BOOL")
        parser.add_argument(f"--no-{flag}", dest=flag, action="store_const", const="false", default=argparse.SUPPRESS,
                            help=f"same as --{flag}=false")
    elif field in _LIST_FIELDS:
        kw.update(nargs="*", metavar="KEY=VALUE")
    elif field in _LIST_VALUE_FIELDS:  # kohya's nargs="*" options of plain values
        kw.update(nargs="*", metavar=field.upper())
    else:
        choices = [c for a in get_args(info.annotation) for c in (get_args(a) if not isinstance(a, str) else (a,))
                   if isinstance(c, str)]
        kw.update(metavar="{" + ",".join(choices) + "}" if choices else field.upper())
    parser.add_argument(f"--{flag}", **kw)


TRAIN_DESCRIPTION = ("Train an Anima LoRA. Options use kohya-ss/sd-scripts names; all of them can also be set in "
                     "a --config_file TOML (the command line wins).")


def build_train_parser(prog: str = "anima-trainer train", description: str = TRAIN_DESCRIPTION,
                       epilog: str | None = None) -> argparse.ArgumentParser:
    """The `anima-trainer train` parser (kohya flag names, `allow_abbrev=False`).  Every option defaults to
    "absent" (argparse.SUPPRESS) so that a TOML value is only overridden by an option actually given; values stay
    strings here and are typed by `TrainConfig`.  Mistakes raise ConfigError instead of exiting; `--help` prints
    the help and exits 0 (SystemExit).  `prog`/`description`/`epilog`: the same options under `cache` and the
    drop-in script."""
    parser = _Parser(prog=prog, allow_abbrev=False, description=help_escape(description),
                     epilog=help_escape(epilog) if epilog else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
    parser.add_argument("--config_file", default=argparse.SUPPRESS, metavar="TOML",
                        help="training TOML (kohya format; '.toml' may be omitted; tables are flattened)")
    for name, info in TrainConfig.model_fields.items():
        req = info.is_required()
        shown = not req and info.default not in (None, False, PydanticUndefined)
        default = f" (default: {info.default})" if shown and "default" not in (info.description or "") else ""
        text = (info.description or "") + (" [required]" if req else default)
        _add(parser, name, name, text.strip())
    for alias, canonical in ko.ALIASES.items():
        _add(parser, alias, canonical, ko.alias_help(alias))
    fields = TrainConfig.model_fields
    for name in ko.RULES:  # accepted (notice) or refused by value; a field wins
        if name not in fields and name not in ko.ALIASES:
            parser.add_argument(f"--{name}", dest=f"{_RULE_PREFIX}{name}", nargs="?", const=True,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            parser.add_argument(f"--no-{name}", dest=f"{_RULE_PREFIX}{name}", action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


_RULE_PREFIX = "rule:"  # argparse dest of the options that are rules, not fields (kept apart from field names)


def _cli_value(v: object) -> object:
    """A rule option's command-line string as kohya's argparse would type it (true/false, numbers)."""
    if not isinstance(v, str):
        return v
    low = v.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _cli_names() -> list[str]:
    return ["config_file", *_field_names(), *ko.ALIASES]


def suggest(name: str, prefix: str = "") -> str:
    """"; did you mean 'x'?" for an unknown name: kohya's renamed keys first (dit_path → pretrained_model_name_or_path
    ...), then the closest spelling among the settings."""
    if name in ko.RENAMED or name.lower() in ko.RENAMED:
        new = ko.RENAMED.get(name) or ko.RENAMED[name.lower()]
        return f"; did you mean '{prefix}{new}'? ('{name}' is an older or another trainer's name for it)"
    return did_you_mean(name, _cli_names(), prefix) or did_you_mean(name, [n for n in ko.RULES if n[:1].islower()],
                                                                    prefix)


def _check_extras(extras: list[str]) -> None:
    """Errors for everything argparse did not recognise (unknown flags, stray words)."""
    lines: list[str] = []
    after_flag = False
    for tok in extras:
        if tok.startswith("-") and not _is_number(tok):
            name = tok.lstrip("-").split("=", 1)[0]
            lines.append(f"unknown option '--{name}'{suggest(name, '--')}")
            after_flag = True
        elif not after_flag:
            lines.append(f"unexpected argument {tok!r} on the command line")
    if lines:
        raise ConfigError("\n".join(lines))


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


@dataclass
class TomlSource:
    """A training TOML, flattened: `values`, the file `name` used in messages and the `lines` of its keys.  For a
    TOML the drop-in generated, `name` and `lines` are those of the user's file it was generated from."""

    values: dict[str, Any]
    name: str
    lines: dict[str, int] = field(default_factory=dict)

    def at(self, key: str) -> str:
        """"in NAME line N" (or "in NAME" when the key is not found in the file text)."""
        line = self.lines.get(key)
        return f"in {self.name} line {line}" if line else f"in {self.name}"


_KEY_LINE = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_\-]+))\s*=""")
_GENERATED = re.compile(r"^# generated by anima_train_network\.py from (.+)$")


def key_lines(text: str) -> dict[str, int]:
    """The 1-based line of each key's first assignment (tomllib keeps no positions; tables are flattened, so the
    bare key is enough)."""
    out: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = _KEY_LINE.match(line)
        if m:
            out.setdefault(next(g for g in m.groups() if g is not None), i)
    return out


def read_train_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    """The flattened contents of a training TOML and the file name used in messages."""
    src = read_train_toml_source(path)
    return src.values, src.name


def read_train_toml_source(path: str | Path) -> TomlSource:
    """`read_train_toml` with the line of every key, for messages that name file and line."""
    p = Path(path).expanduser()
    if not p.is_file() and p.suffix.lower() != ".toml" and p.name:  # "" and "." have no name to extend
        alt = p.with_name(p.name + ".toml")
        if alt.is_file():
            p = alt
        else:
            raise ConfigError(f"config_file: '{p}' not found (also tried '{alt}')")
    if not p.is_file():
        what = "is a folder, not a TOML file" if p.is_dir() else "is not a regular file" if p.exists() else "not found"
        raise ConfigError(f"config_file: '{p}' {what}")
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config_file: '{p}' is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config_file: '{p}' is not valid TOML: {e} (TOML files are UTF-8; save it as UTF-8)") \
            from None
    except OSError as e:
        raise ConfigError(f"config_file: '{p}' cannot be read: {e.strerror or e}") from None
    except RecursionError:  # tomllib recurses per nesting level: thousands of `[[[...` exhaust the stack
        raise ConfigError(f"config_file: '{p}' is nested too deeply to be read (a hostile or broken TOML; kohya's "
                          "training TOMLs use one level of tables)") from None
    if evidence := root_style_evidence(data):  # its tables are not cosmetic: flattening would mangle it
        raise ConfigError(
            f"config_file: '{p}' is a root-style Anima_Trainer config (it has {', '.join(evidence[:3])}), not a "
            f"kohya training TOML; convert it once with `anima-trainer convert-config {p} --out DIR` and train "
            "with `--config_file DIR/train.toml` (or run it through `anima_train_network.py`, which converts it "
            "on the fly)")
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for top, value in data.items():
        items = value.items() if isinstance(value, dict) else [(top, value)]
        table = f"[{top}]" if isinstance(value, dict) else "the top level"
        for k, v in items:
            if isinstance(v, dict):
                raise ConfigError(f"'{k}' in {table} of {p.name} is a table; only one level of tables is allowed "
                                  "(table names are cosmetic, the keys inside are the options)")
            if k in flat:
                raise ConfigError(f"key '{k}' appears in both {where[k]} and {table} of {p.name}")
            flat[k], where[k] = v, table
    if "config_file" in flat:
        raise ConfigError(f"config_file: cannot be set inside a config file ({p.name})")
    return _source(flat, p)


def _source(flat: dict[str, Any], p: Path) -> TomlSource:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return TomlSource(flat, p.name)
    first = text.split("\n", 1)[0]
    if (m := _GENERATED.match(first)) is not None:  # the drop-in's copy: point at the user's own file
        user = Path(m.group(1)).expanduser()
        if not user.is_file() and user.with_name(user.name + ".toml").is_file():
            user = user.with_name(user.name + ".toml")
        try:
            return TomlSource(flat, user.name, key_lines(user.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            return TomlSource(flat, user.name)
    return TomlSource(flat, p.name, key_lines(text))


def _canonical(values: dict[str, Any], src: TomlSource | None, rules: dict[str, tuple[Any, str, str]]
               ) -> tuple[dict[str, Any], set[str]]:
    """Aliases → canonical names (conflicts are errors); unknown names are errors.  `src` is the TOML (None: the
    command line).  Returns the canonical values and the canonical names that were set through an alias; the
    options that are rules (kohya_options.RULES) go to `rules` as name → (value, as written, where), judged once
    all settings are known (the command line, read last, replaces the TOML's)."""
    fields = set(_field_names())
    out: dict[str, Any] = {}
    via_alias: set[str] = set()
    lines: list[str] = []

    def where(key: str) -> str:
        return src.at(key) if src is not None else "on the command line"

    for key, value in values.items():
        from_cli = src is None and key.startswith(_RULE_PREFIX)
        if from_cli:
            key, value = key[len(_RULE_PREFIX):], _cli_value(value)
        if key in fields:  # a field always wins over the tables: it is implemented
            out.setdefault(key, value)
        elif ko.rule_for(key) is not None:
            rules[key] = (value, f"--{key}" if src is None else key, where(key))
        elif key in ko.SWITCHES:
            out[key] = value  # under its own name until both layers are merged (_apply_switches)
        elif key in ko.ALIASES:
            canonical = ko.ALIASES[key]
            if value == "":  # sd-scripts-anima's "unset"
                continue
            if key in ko.KOHYA_DEFAULT_OFF and src is not None and not _is_on(value):
                # kohya's default written out (GUIs, --output_config): our default stays, read as that field's false
                kohya_field = ko.KOHYA_DEFAULT_OFF[key]
                if kohya_field not in values:
                    out[kohya_field] = False
                continue
            if key in ko.ALIAS_NOTICES:
                rules[key] = (value, f"--{key}" if src is None else key, where(key))
            if key in ("anima_timestep_sampling", "timestep_sample_method"):
                if value not in ko.ANIMA_TIMESTEP_SAMPLING_VALUES:
                    lines.append(f"{key}: expected one of "
                                 f"{', '.join(map(repr, ko.ANIMA_TIMESTEP_SAMPLING_VALUES))}, got {value!r} "
                                 f"({where(key)})")
                    continue
                value = ko.ANIMA_TIMESTEP_SAMPLING_VALUES[value]
            if canonical in values and values[canonical] != value:
                lines.append(f"'{key}' (sd-scripts-anima name of '{canonical}') and '{canonical}' are both set "
                             f"{where(key)}, to different values ({values[key]!r} and {values[canonical]!r})")
                continue
            out[canonical] = value
            via_alias.add(canonical)
        else:
            lines.append(f"unknown key '{key}' {where(key)}{suggest(key)}")
    if lines:
        raise ConfigError("\n".join(lines))
    return out, via_alias


def _sd_scripts_anima_timesteps(merged: dict[str, Any], via_alias: set[str]) -> None:
    """Using one of sd-scripts-anima's timestep names asks for its sampling: the settings of that trio not given
    by any name take sd-scripts-anima's defaults (logit-normal = kohya's `shift`, shift 3.0)."""
    if not via_alias & {ko.ALIASES[a] for a in ko.SD_SCRIPTS_ANIMA_TIMESTEP_ALIASES}:
        return
    for k, v in ko.SD_SCRIPTS_ANIMA_TIMESTEP_DEFAULTS.items():
        merged.setdefault(k, v)
    shift = merged["discrete_flow_shift"]
    if "timestep_sampling" in via_alias and merged["timestep_sampling"] == "uniform" and not _is_one(shift):
        raise ConfigError(
            f"anima_timestep_sampling: sd-scripts-anima's 'uniform' shifts t by the flow shift ({shift}), "
            "anima-trainer's 'uniform' does not; set anima_flow_shift = 1.0 for unshifted uniform sampling, "
            "or use timestep_sampling = \"shift\" (logit-normal, shifted)")


def _apply_switches(merged: dict[str, Any], from_toml: set[str], src: TomlSource | None) -> list[str]:
    """kohya's switches (kohya_options.SWITCHES) → the settings they turn on, as kohya reads them: each name with its
    own precedence, then `or`.  Returns the start-up notice of a switch that turned on a setting given as off or not
    given (kohya logs the same: "unsloth_offload_checkpointing is enabled, so gradient_checkpointing is also
    enabled"); the switch's own target, of which it is kohya's name, needs no notice."""
    notices = []
    for name, sets in ko.SWITCHES.items():
        if name not in merged:
            continue
        raw = merged.pop(name)
        try:
            on = _BOOL.validate_python(raw)
        except ValidationError:
            at = f" ({src.at(name)})" if src is not None and name in from_toml else ""
            raise ConfigError(f"{name}: expected true or false, got {raw!r}{at}") from None
        if not on:
            continue
        turned_on = [k for k in sets if k != ko.ALIASES[name] and not _is_on(merged.get(k, False))]
        merged.update(sets)
        if turned_on:
            shown = name if name in from_toml else f"--{name}"
            notices.append(f"{shown} = true: turns on {', '.join(turned_on)} too, as kohya does")
    return notices


_BOOL: TypeAdapter[bool] = TypeAdapter(bool)  # the same words a bool field accepts


def _is_on(v: Any) -> bool:
    try:
        return _BOOL.validate_python(v)
    except ValidationError:
        return False  # a bad value: TrainConfig reports it


def _is_one(v: Any) -> bool:
    try:
        return float(v) == 1.0
    except (TypeError, ValueError):
        return False  # a bad value: TrainConfig reports it


def parse_train_args(argv: list[str] | None = None, *, prog: str = "anima-trainer train",
                     description: str = TRAIN_DESCRIPTION, epilog: str | None = None,
                     check: Callable[[TrainConfig], TrainConfig] | None = None) -> TrainConfig:
    """Build the TrainConfig from `argv` (without the `train` word; None → sys.argv[1:]) and its --config_file.
    `prog`/`description`/`epilog` only change what `--help` prints.  The start-up notices (one per option that
    is accepted without effect, and the schedule's) are `TrainConfig.notices`.  `check`: the run's start-up check
    of the optimizer and schedule (train/optim.py check_optimization, given by the commands), applied before
    --output_config writes its file; a run applies it at start-up (train/setup.py setup_run)."""
    parser = build_train_parser(prog, description, epilog)
    ns, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    _check_extras(extras)
    cli_raw = vars(ns)
    config_file = cli_raw.pop("config_file", None)
    rules: dict[str, tuple[Any, str, str]] = {}
    toml: dict[str, Any] = {}
    toml_alias: set[str] = set()
    src: TomlSource | None = None
    output_config = _output_config_asked(cli_raw.pop("output_config", None), config_file)
    if output_config:  # kohya: --config_file is then the file to write, not read
        config_file = None
    if config_file is not None:
        src = read_train_toml_source(config_file)
        toml, toml_alias = _canonical(src.values, src, rules)
    cli, cli_alias = _canonical(cli_raw, None, rules)
    merged = {**toml, **cli}
    switch_notices = _apply_switches(merged, set(toml) - set(cli), src)
    seed_style = ko.is_sd_scripts_anima({**(src.values if src else {}), **cli_raw})
    if seed_style:  # written for sd-scripts-anima: its defaults where the config sets nothing
        merged.setdefault("sd_scripts_anima_defaults", True)
    notices = _judge_rules(rules, merged) + switch_notices
    # a canonical name counts as "set through an alias" when the layer that won for it used the alias
    via_alias = cli_alias | {k for k in toml_alias if k not in cli}
    _sd_scripts_anima_timesteps(merged, via_alias)
    origin = ConfigOrigin(src, frozenset(set(toml) - set(cli) - {"output_config"})) if src is not None else None
    try:
        for key in ("optimizer_type", "lr_scheduler_type"):  # importlib raises TypeError for relative modules
            v = merged.get(key)
            if isinstance(v, str) and v.strip().rpartition(".")[0].startswith("."):
                raise ConfigError(f"{key}: {v!r} is not a class name or a module.Class path (a module name "
                                  "cannot start with '.')")
            if isinstance(v, str) and "." in v.strip():
                _cwd_importable()
        if toml.pop("output_config", None) not in (None, False, "false", "False"):
            notices.append(f"output_config in {config_file}: no effect there (kohya reads it only on the command "
                           "line, where it writes the settings to the --config_file path and exits); training goes "
                           "on")
        merged.pop("output_config", None)
        cfg = make_train_config(merged)
    except ConfigError as e:
        if origin is None:
            raise
        raise ConfigError(origin.locate(str(e))) from None
    cfg._origin = origin
    if output_config:
        if check is not None:  # a config that would not train is not written (and is written as it would train)
            cfg = check(cfg)
        write_output_config(cfg, output_config)
        raise SystemExit(0)
    cfg.set_compat(notices=notices, sd_scripts_anima=seed_style)
    cfg.notices.extend(schedule_notices(cfg, given=set(merged)))
    cfg.notices.extend(flow_notices(cfg, given=set(merged)))
    cfg.notices.extend(sample_notices(cfg))
    cfg.notices.extend(cfg.evaluation_notices())
    return cfg


def sample_notices(cfg: TrainConfig) -> list[str]:
    """Preview schedules without a prompt file: kohya makes no previews then (GUIs write the schedule anyway)."""
    return [f"{k} = {getattr(cfg, k)}: no sample_prompts are given, so no previews are made (as in kohya); set "
            "sample_prompts to a prompt file to get them"
            for k in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
            if getattr(cfg, k) and cfg.sample_prompts is None]


def _output_config_asked(value: Any, config_file: str | None) -> str | None:
    """The --config_file path when --output_config asks to write it; None when not asked."""
    if value is None or str(value).strip().lower() in ("false", "0", "no", "off", ""):
        return None
    if str(value).strip().lower() not in ("true", "1", "yes", "on"):
        raise ConfigError(f"output_config: expected true or false, got {value!r}")
    if config_file is None:
        raise ConfigError("output_config: needs --config_file naming the TOML file to write (kohya's "
                          "--output_config writes the settings there and exits)")
    return config_file


def flow_notices(cfg: TrainConfig, given: set[str]) -> list[str]:
    """Flow-matching settings that have no effect with the chosen timestep_sampling (kohya v0.11.1 logs the same,
    kohya_anima.md §1.1-1.2): said once at start-up instead of being silently ignored."""
    out, ts = [], cfg.timestep_sampling
    if "discrete_flow_shift" in given and cfg.discrete_flow_shift != 1.0 and ts in ("sigmoid", "uniform",
                                                                                     "flux_shift"):
        out.append(f"discrete_flow_shift = {cfg.discrete_flow_shift:g}: not used by timestep_sampling '{ts}' (only "
                   "by shift and sigma); no effect")
    if "sigmoid_scale" in given and cfg.sigmoid_scale != 1.0 and ts in ("uniform", "sigma"):
        out.append(f"sigmoid_scale = {cfg.sigmoid_scale:g}: not used by timestep_sampling '{ts}' (only by "
                   "sigmoid, shift and flux_shift); no effect")
    if cfg.weighting_scheme in ("logit_normal", "mode") and ts != "sigma":
        out.append(f"weighting_scheme = '{cfg.weighting_scheme}': for Anima it only shapes the timestep density of "
                   f"timestep_sampling = \"sigma\" (it is no loss weight); no effect with '{ts}'")
    return out


def _judge_rules(rules: dict[str, tuple[Any, str, str]], settings: dict[str, Any]) -> list[str]:
    """One notice per accepted rule option; all refused ones at once as a ConfigError naming file and line."""
    notices, errors = [], []
    for name, (value, shown, where) in rules.items():
        if name in ko.ALIAS_NOTICES:
            notices.append(f"{shown} = {value!r}: {ko.ALIAS_NOTICES[name]}")
            continue
        kind, text = ko.rule_message(name, value, shown, settings)
        if kind == "ok":  # works with kohya's meaning
            continue
        if kind == "error":
            errors.append(f"{text} ({where})")
        else:
            notices.append(text)
    if errors:
        raise ConfigError("\n".join(errors))
    return notices


def _cwd_importable() -> None:
    """kohya users keep their own optimizer / scheduler package next to the script (kohya runs with the script's
    folder on sys.path): `optimizer_type = "pkg.module.Class"` imports from the working directory here too."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


@dataclass(frozen=True, eq=False)
class ConfigOrigin:
    """Where a TrainConfig's settings came from: the TOML and the keys it set that the command line did not.
    parse_train_args keeps it on the config (`TrainConfig._origin`) so that an error found at the run's start-up
    (train/optim.py check_optimization) names the user's file and line like a parse-time error."""

    source: TomlSource
    from_toml: frozenset[str]

    def __eq__(self, other: object) -> bool:
        """Always equal (to None too): where the settings came from is no setting, and a TrainConfig's private
        attributes take part in its `==` — the same settings from a TOML and from the command line are equal."""
        return other is None or isinstance(other, ConfigOrigin)

    __hash__ = None  # type: ignore[assignment]

    def locate(self, message: str) -> str:
        """Each line of a TrainConfig message that starts with a key the TOML set (and the command line did not)
        gets " (in NAME line N)": the user learns which file and line to edit."""
        lines = []
        for line in message.split("\n"):
            key = line.split(":", 1)[0].split(" ", 1)[0]
            lines.append(f"{line} ({self.source.at(key)})" if key in self.from_toml else line)
        return "\n".join(lines)


def locate_in_source(cfg: TrainConfig, message: str) -> str:
    """`message` with the file and line of each key it starts a line with (ConfigOrigin.locate), for a config
    parse_train_args read from a TOML; unchanged for one built otherwise (command line only, make_train_config)."""
    origin = cfg._origin
    return origin.locate(message) if origin is not None else message
