"""Argument types and flag groups shared by the commands."""

from __future__ import annotations

import argparse
import math
import os.path
import re
import sys
from pathlib import Path

from harness.config import DTYPES


class Parser(argparse.ArgumentParser):
    """argparse whose bad-input message stands alone: `prog: error: MSG` and where to look, not the 15-line
    usage printed above it, which pushed the message to the bottom; an unknown flag close to a known one is
    named (`--limt 3`: did you mean --limit?). Exit status 2, as argparse's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with a minus and a digit (`-1GB`, `-100,200`) is a value, not a flag: argparse's own
        # pattern takes only plain numbers (`-5`), so `--max-shard-size -1GB` said "expected one argument" instead of
        # the flag's own message. No flag of the harness starts with a digit.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self._did_you_mean(message)}\n"
                     f"  (the flags: {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for the hint on a required flag (`error`)
        return super().parse_known_args(args, namespace)

    def _did_you_mean(self, message: str) -> str:
        """A hint for each unknown flag close to a known one: those argparse names, or, where it stopped at a missing
        required flag first (`check --againts X`: "required: --against"), the unknown ones of the command line."""
        import difflib

        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
        elif message.startswith("the following arguments are required:"):
            words = [w for w in getattr(self, "_argv", [])  # not a flag argparse took, nor its abbreviation
                     if not any(o.startswith(w.split("=", 1)[0]) for o in self._option_string_actions)]
        else:
            return ""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        hints = []
        for word in words:
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
            hints += [f"{flag}: did you mean {close[0]}?"] if close else []
        return f" ({'; '.join(hints)})" if hints else ""


MODES = {"unified": ("unified",), "disaggregated": ("disaggregated",), "both": ("unified", "disaggregated")}


def _split(s: str) -> tuple[str, ...]:
    """The items of a comma-separated flag. Only a flag with no item at all (`--methods ""`) is empty, for the command
    to refuse by name; an empty item among others (`--prompt-tokens 64,,`, `--methods a,,b`) was dropped without a word."""
    items = tuple(x.strip() for x in s.split(","))
    if not any(items):
        return ()
    if not all(items):
        raise argparse.ArgumentTypeError(f"{s!r} has an empty item (two commas in a row, or one at an end); "
                                         "give the items separated by single commas, e.g. a,b")
    return items


def csv_list(s: str) -> tuple[str, ...]:
    """A comma-separated list of names, each once: a repeat (`--methods unpruned,unpruned`, `--tasks boolq,boolq`) ran
    once where the line asked for two. (A numeric list's repeats are its command's to name: `16,016` is 16 twice.)"""
    items = _split(s)
    twice = next((x for i, x in enumerate(items) if x in items[:i]), None)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"{twice} is given twice in {s!r}; give each item once")
    return items


def _int_at_least(s: str, least: int, what: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is None or n < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return n


def positive_int(s: str) -> int:
    return _int_at_least(s, 1, "a positive integer")


def nonneg_int(s: str) -> int:
    return _int_at_least(s, 0, "an integer >= 0")


def seed_arg(s: str) -> int:
    """A seed numpy and lm-eval accept: 0 .. 2**32 - 1 (lm-eval seeds numpy with it, after the planning)."""
    n = _int_at_least(s, 0, "an integer from 0 to 4294967295 (numpy's seed range)")
    if n > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 4294967295 (numpy's seed range), got {s!r}")
    return n


DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16 (also fp32, bf16, fp16) (default: auto)"


def dtype_arg(s: str) -> str:
    """A dtype by its full name: `bf16` is stored as `bfloat16`, so records name one dtype one way (a run key of `bf16`
    differed from one of `bfloat16`, and a rerun typed the other way was refused as another configuration)."""
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16), got {s!r}")
    return DTYPES[s]


def device_arg(s: str) -> str:
    """A device as the model loader takes it, checked when the flags are read: `--device gpu` was refused only after
    seconds of imports. Kept as typed (CUDA's availability is the loader's to check)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N] (e.g. cuda:1), got {s!r}")
    return s


def user_path(s: str) -> str:
    """A path with `~` expanded (`--data-dir=~/data`: no shell expanded it); other text as given (`random:tiny`)."""
    return os.path.expanduser(s)


def path_arg(s: str) -> str:
    """`user_path` for a flag that names a file or folder, an empty one refused: `--data-dir "$DATA"` and
    `--plans-from "$RUN"` with the variable unset ran as if the flag were not given (hub datasets, plans made afresh),
    and `sweep ""` looked for a spec named `.`."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); give a file or folder, or leave the "
                                         "flag out")
    return user_path(s)


def spec_arg(s: str) -> Path:
    """A spec file's path (`path_arg`'s refusal of an empty one)."""
    return Path(path_arg(s))


def env_path(name: str) -> str | None:
    """A path flag's default from the environment variable `name`; unset, empty or blank is no default (argparse passes
    a string default through the flag's type, which refuses an empty path: for a flag not given, and a spec's section
    ended in a traceback)."""
    value = os.environ.get(name)
    return value if value and value.strip() else None


def model_arg(s: str) -> str:
    """`--model`: `user_path`, but an empty one is refused (`--model "$MODEL"` with MODEL unset read the current folder
    as a model folder, and said it held no config.json)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty model (an unset shell variable?); give smollm2-135m, a .gguf file, "
                                         "a model folder, a Hugging Face id or random:<preset>")
    return user_path(s)


def need_records_folder(path: str | None, flag: str) -> None:
    """A UsageError, before any model loads, when `path` (a --plans-from) is not a folder; a relative one names the
    folder it was read from (a spec run from elsewhere reads its relative paths from there)."""
    from harness.errors import UsageError

    if path and not Path(path).is_dir():
        where = "" if Path(path).is_absolute() else f" (relative paths are read from the current folder, {Path.cwd()})"
        raise UsageError(f"{flag} {path}: not a folder of run records{where}")


def user_dir(s: str) -> Path:
    """`user_path` as a Path (--out=~/runs/x). An empty one is refused: `--out "$OUT"` with OUT unset wrote a run's
    records into the current folder, and `check --against ""` compared every record under it."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); give a folder, or . for the current one")
    return Path(user_path(s))


def _finite(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return x


def positive_float(s: str) -> float:
    x = _finite(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return x


def nonneg_float(s: str) -> float:
    x = _finite(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return x


def limit_arg(s: str) -> int | float | None:
    """`--limit`: 'all' (None), a count of items (int >= 1) or, as in lm-eval, a fraction of each
    task's items (0 < x < 1); a whole number written as a float (`100.0`) is that count."""
    if s.lower() in ("all", "none", "full"):
        return None
    try:
        x = float(s)
    except ValueError:
        x = math.nan
    if math.isfinite(x) and x >= 1 and x == int(x):
        return int(x)
    if 0 < x < 1:
        return x
    raise argparse.ArgumentTypeError(f"expected a positive integer, a fraction between 0 and 1 (exclusive) or 'all', got {s}")


AUTO_BATCH = "auto"


def batch_size_arg(s: str) -> int | str:
    """`--batch-size`: a positive integer, `auto` (the largest size that fits, found on the longest
    request) or `auto:N` (found again N times as requests get shorter), lm-eval's spellings."""
    low = s.strip().lower()
    if low == AUTO_BATCH:
        return AUTO_BATCH
    if low.startswith(AUTO_BATCH + ":"):
        try:
            return f"{AUTO_BATCH}:{positive_int(low.split(':', 1)[1])}"
        except argparse.ArgumentTypeError:
            pass
        raise argparse.ArgumentTypeError(f"expected auto:N with N a positive integer, got {s!r}")
    try:
        return positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'auto:N', got {s!r}") from None


def float_list(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in _split(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s}")
    return vals


def int_list(s: str) -> tuple[int, ...]:
    vals = tuple(positive_int(x) for x in _split(s))
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return vals
