"""The value variants the downstream experiments compare, all read from two trackers of one run.

One tracker with ``credit="momentum"`` and ``record_steps=True`` (the library's default
linearization, secant + midpoint, and ``route="auto"``) holds, in its history, each step's own
values (rows with ``origin == step``) and the momentum-carried credits that later steps send back
(rows with ``origin < step``); a second tracker holds the SGD proxy (J = −lr, current point). From
them, without another training run:

* ``step``: per-step credit, Σ_t φ_z^(t) (what ``credit="step"`` would total);
* ``step-no-early``: the same without the early steps: the leading steps that the exact-update
  route valued (``step_info`` route other than ``"linear"`` from step 0 up to the first linear
  step: Adam's sign-like first step(s), which dominate totals from initialisation). Later steps
  that the route valued partly exactly (a parameter whose gradient is near zero) are kept;
* ``momentum``: per-step plus carried credit (what ``credit="momentum"`` totals; the steps still
  open in the momentum window at the end are closed by their tail estimate, as ``save`` does);
* ``momentum-no-early``: the same without the exact-route steps' own values and their carried credit;
* ``sgd-proxy``: the SGD-proxy tracker's totals.
"""

from __future__ import annotations

import contextlib

import pandas as pd

from attribution import InRunShapley

#: The two trackers of a run (name -> ``InRunShapley`` keyword arguments).
TRACKERS = {
    "adam": {"credit": "momentum", "record_steps": True},
    "sgd-proxy": {"linearization": "sgd", "val_point": "current"},
}
#: The value variants :func:`variant_values` derives, in reporting order.
VARIANTS = ("step", "step-no-early", "momentum", "momentum-no-early", "sgd-proxy")


def make_trackers(model, optimizer, loss_fn, val_batches) -> dict[str, InRunShapley]:
    """The :data:`TRACKERS` of one run, by name, on ``model`` and ``optimizer``."""
    return {name: InRunShapley(model, optimizer, loss_fn, val_batches, **kw) for name, kw in TRACKERS.items()}


@contextlib.contextmanager
def tracked_batch(trackers: dict, ids):
    """Every tracker's ``batch(ids)`` around one forward+backward (nothing for an empty dict)."""
    with contextlib.ExitStack() as stack:
        for tracker in trackers.values():
            stack.enter_context(tracker.batch(ids))
        yield


def early_steps(tracker) -> list[int]:
    """The leading steps the tracker valued (wholly or for some parameters) by the exact-update route.

    Steps 0, 1, ... up to (not including) the first step valued by the slope alone.
    """
    out = []
    for step, route in tracker.step_info()[["step", "route"]].itertuples(index=False):
        if route == "linear":
            break
        out.append(int(step))
    return out


def exact_steps(tracker) -> list[int]:
    """Every step the tracker valued (wholly or for some parameters) by the exact-update route."""
    info = tracker.step_info()
    return sorted(int(s) for s in info.loc[info["route"] != "linear", "step"])


def variant_values(trackers: dict) -> dict[str, pd.DataFrame]:
    """Each of :data:`VARIANTS` as a frame indexed by id with the trackers' value columns.

    Args:
        trackers: ``{"adam": tracker, "sgd-proxy": tracker}`` built with :data:`TRACKERS` on one run.
    Returns:
        ``{variant: DataFrame}``; ids a variant never credited (all their steps early) are absent.
    """
    adam = trackers["adam"]
    early = early_steps(adam)
    live = adam.history()
    columns = [c for c in live.columns if c == "value" or c.startswith("value_")]
    # a step's own values: the live history's rows of origin == step (a carried credit arrives later)
    own = live[live["origin"] == live["step"]]
    # with the window's open steps closed by their tails, as InRunShapley.save writes them (the tail
    # of step t is a row of origin t at the last step, so only the live history tells own rows apart)
    closed = adam._gathered(closed=True).history_frame()
    picks = {"step": own, "step-no-early": own[~own["origin"].isin(early)],
             "momentum": closed, "momentum-no-early": closed[~closed["origin"].isin(early)]}
    out = {name: rows.groupby("id", sort=False)[columns].sum() for name, rows in picks.items()}
    out["sgd-proxy"] = trackers["sgd-proxy"].values()[columns]
    return out
