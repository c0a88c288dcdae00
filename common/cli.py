"""The command line of both scripts: arguments from dataclasses, from the command line or a JSON file first.

Every mistake ends in one `error: ...` line on stderr and exit code 2: no traceback, no usage block, and no
abbreviations (`--eval-sample` is not taken for `--eval-samples`). Help spells options as the README does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

RUN_RECORD_SECTIONS = {"experiment", "engine", "profile"}  # the layout of a run's config.json
REDACTED = "<redacted>"  # what config.json holds instead of an access token: never replayed as one
TRUE_WORDS, FALSE_WORDS = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


class HelpFormatter(argparse.HelpFormatter):
    """`--data-dir DATA_DIR`, not `--data_dir DATA_DIR, --data-dir DATA_DIR`; a flag as `--smoke`; each default once."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        name = max(action.option_strings, key=lambda option: ("-" in option[2:], len(option)))
        if action.nargs in ("?", 0):  # a switch: `--smoke` alone means true
            return name
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def string_to_bool(value: str) -> bool:
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of "
                                     f"{', '.join(TRUE_WORDS + FALSE_WORDS)} (case insensitive).")


def add_dataclass_arguments(parser: argparse.ArgumentParser, dataclass_type: type) -> None:
    """One option per field, as transformers' HfArgumentParser makes them (`--a_b` and `--a-b`; a switch takes an
    optional true/false; `--no-x` for a switch that is on by default), without importing transformers (seconds)."""
    hints = typing.get_type_hints(dataclass_type)
    for field in dataclasses.fields(dataclass_type):
        names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # `int | None`: the value's type; None stays the default
            kind = next(t for t in kind.__args__ if t is not type(None))
        help_text = field.metadata.get("help")
        if kind is bool:
            parser.add_argument(*names, type=string_to_bool, nargs="?", const=True, default=field.default,
                                help=help_text)
            if field.default is True:
                parser.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                                    dest=field.name, help=f"Turn {names[-1]} off (it is on by default).")
        else:
            parser.add_argument(*names, type=kind, default=field.default, help=help_text)


class ArgumentParser(argparse.ArgumentParser):
    """Options from dataclasses; errors are one line and exit 2, without abbreviation matching."""

    def __init__(self, dataclass_types: Sequence[type], description: str | None = None, prog: str | None = None):
        prog = prog or Path(sys.argv[0]).name
        super().__init__(
            prog=prog, description=description, allow_abbrev=False, formatter_class=HelpFormatter,
            usage=f"python3 {prog} [CONFIG.json] [--option VALUE ...]   (--help lists every option)",
        )
        self.dataclass_types = list(dataclass_types)
        for dataclass_type in self.dataclass_types:
            add_dataclass_arguments(self, dataclass_type)
        self.source: str | None = None  # a config file the arguments being parsed came from, named in errors
        self.profile: dict | None = None  # the script's profile, which a run's config.json must name

    def error(self, message: str) -> NoReturn:
        # argparse names an option by all its spellings ("argument --batch_size/--batch-size: ..."): keep the README's.
        message = re.sub(r"argument (?:--[\w]+/)?(--[\w-]+)", r"\1", message)
        # A switch takes an optional value, so `--smoke config.json` reaches here with the file as the value.
        if switch := re.match(r"(--[\w-]+): Truthy value expected: got (.+?) but expected", message):
            flag, value = switch.groups()
            message = (self.json_first(value) if value.endswith(".json")
                       else f"{flag} is a switch: give it alone, or followed by true or false (got {value!r})")
        where = f"{self.source}: " if self.source else ""
        self.exit(2, f"error: {where}{message}\n")

    def json_first(self, path: str) -> str:
        return f"{path}: a JSON config file must come first (python3 {self.prog} {path} [--option VALUE ...])"

    def option_names(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if "_" not in option]

    def did_you_mean(self, name: str, as_key: bool = False) -> str:
        close = difflib.get_close_matches(name.replace("_", "-"), self.option_names(), n=1, cutoff=0.6)
        if not close:
            return " (--help lists every option)"
        return f" (did you mean {close[0][2:].replace('-', '_')!r}?)" if as_key else f" (did you mean {close[0]}?)"

    def parse(self, tokens: list[str]) -> tuple:
        namespace, remaining = self.parse_known_args(tokens)
        parsed = [kind(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(kind)})
                  for kind in self.dataclass_types]
        if remaining:
            options = [token.split("=", 1)[0] for token in remaining if token.startswith("-")]
            if options:
                self.error(f"unknown option {options[0]}{self.did_you_mean(options[0])}")
            if remaining[0].endswith(".json"):
                self.error(self.json_first(remaining[0]))
            self.error(f"unexpected value {remaining[0]!r} (every value follows its --option)")
        return tuple(parsed)

    def run_record_values(self, path: Path, record: dict) -> dict:
        """A run's config.json ({"experiment": ..., "engine": ..., "profile": ...}) as option values, so that
        `python3 modified.py runs/modified/config.json` repeats the run: its profile must be this script's."""
        written_by = record.get("profile")
        if self.profile is not None and written_by is not None and written_by != self.profile:
            name = written_by.get("name", "?")
            if name != self.profile.get("name"):
                self.error(f"{path}: written by a run of {name}.py (its profile section): run python3 {name}.py {path}")
            self.error(f"{path}: its profile section differs from {self.prog}'s; the profile is what the script names "
                       "(common/profiles.py), not an option: remove the section")
        values = {**record.get("experiment", {}), **record.get("engine", {})}
        # How the run was started is not the experiment: repeating it never clears or resumes a directory unasked.
        return {key: value for key, value in values.items()
                if key not in ("overwrite", "resume") and value != REDACTED}

    def config_file_tokens(self, path: Path) -> list[str]:
        """The file's keys and values as command-line tokens, so they are checked and converted as typed ones are."""
        if path.is_dir():
            self.error(f"{path}: a directory, not a config file (a JSON file of option names and values)")
        if not path.is_file():
            self.error(f"{path}: config file not found")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.error(f"{path}: not valid JSON ({err})")
        except OSError as err:
            self.error(f"{path}: cannot read it ({err.strerror})")
        if not isinstance(values, dict):
            self.error(f"{path}: expected a JSON object of option names and values, e.g. {{\"seed\": 7}}")
        if RUN_RECORD_SECTIONS & set(values) and all(isinstance(v, dict) for v in values.values()):
            values = self.run_record_values(path, values)
        actions = {action.dest: action for action in self._actions if action.option_strings}
        tokens = []
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in actions or dest == "help":
                self.error(f"{path}: unknown key {key!r}{self.did_you_mean('--' + dest, as_key=True)}")
            if value is None and actions[dest].default is None:
                continue
            if isinstance(value, bool):
                value = str(value).lower()
            elif not isinstance(value, (int, float, str)):
                self.error(f"{path}: {key}: expected a number, text, true or false, got {json.dumps(value)}")
            tokens.append(f"--{dest}={value}")  # `=`: a value that starts with "-" is not taken for an option
        return tokens


def parse_command_line(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    smoke_defaults: dict | None = None,
    description: str | None = None,
    prog: str | None = None,
    profile: dict | None = None,
) -> tuple:
    """One instance per dataclass, from `[CONFIG.json] [--option VALUE ...]` (the command line wins over the file).

    With `--smoke` (given either way) `smoke_defaults` replace the defaults; anything given explicitly still wins.
    A run's config.json is accepted as the file when its `profile` section is `profile`.
    """
    parser = ArgumentParser(dataclass_types, description, prog)
    parser.profile = profile
    tokens = list(sys.argv[1:] if argv is None else argv)
    if tokens and tokens[0].endswith(".json") and not tokens[0].startswith("-"):
        file_tokens = parser.config_file_tokens(Path(tokens[0]))
        parser.source = tokens[0]
        parser.parse(file_tokens)  # errors in the file name the file
        parser.source = None
        tokens = file_tokens + tokens[1:]
    parsed = parser.parse(tokens)
    if smoke_defaults and any(getattr(instance, "smoke", False) for instance in parsed):
        parser.set_defaults(**smoke_defaults)
        parsed = parser.parse(tokens)
    return parsed
