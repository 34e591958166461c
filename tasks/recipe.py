"""The recipe search: one Optuna study over compression chains, run on the plan graph.

A trial is a chain (student -> structured pruning -> TT tables -> quantization with per-table
dtypes and optional QAT) that `suggest` builds from the trial's choices. Every trial's stages
are nodes of the run's graph, so a prefix two trials share (one student, one factorization) is
built once, wherever the executor runs it (Ray workers in the flow, this process in the
bench). Trials are asked `parallelism` at a time (ask/tell) and run stage by stage: after each
stage but the last, a quick check on `proxy_rows` valid rows reports the prefix's loss, and a
prefix that already loses `prune_at` times the budget is pruned (Optuna's ThresholdPruner) before
its later, costlier stages run. A trial's score is its model on the whole valid split, with
its batch-512 latency timed side by side with the baseline's. The test split is never read
here: the chosen front becomes ordinary candidates the gate judges on test.

Samplers (seeded): TPE for one objective, NSGA-II for several; the budget's quality loss (and
its size and latency constraints) are Optuna constraints, so infeasible trials inform the
sampler without being chosen.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import pyarrow.parquet as pq

from tasks.execute import Executed, Executor
from tasks.models import resolve
from tasks.plan import Graph
from tasks.quant.mixed import Option, assign
from tasks.quant.schemes import EMBEDDING
from tasks.runtime import Built, current_store, using_store
from tasks.types import (
    MAIN_METRIC,
    Budget,
    Candidate,
    DistillConfig,
    DlrmSpec,
    FactorizeConfig,
    ModelSpec,
    PruneConfig,
    QuantizeConfig,
    RecipeSearch,
    SasrecSpec,
    SearchReport,
    SearchSpace,
    TrialRecord,
    TwoTowerSpec,
    Validated,
)


def _scaled(widths: tuple[int, ...], share: float) -> tuple[int, ...]:
    return tuple(max(8, int(round(w * share))) for w in widths)


def student_spec(spec: ModelSpec, dim: int, width: float) -> ModelSpec | None:
    """The input model's family at embedding width `dim` and `width` times its hidden widths;
    None when that is no student (a user's own class, or not smaller than the input)."""
    if dim <= 0 or (dim >= spec.embedding_dim and width >= 1):
        return None
    if isinstance(spec, DlrmSpec):
        return DlrmSpec(embedding_dim=dim, bottom_mlp=(*_scaled(spec.bottom_mlp[:-1], width), dim),
                        top_mlp=_scaled(spec.top_mlp, width), interaction=spec.interaction)
    if isinstance(spec, TwoTowerSpec):
        return TwoTowerSpec(embedding_dim=dim, tower_mlp=_scaled(spec.tower_mlp, width),
                            temperature=spec.temperature)
    if isinstance(spec, SasrecSpec):
        heads = max(h for h in range(1, spec.heads + 1) if dim % h == 0)
        return SasrecSpec(embedding_dim=dim, layers=max(1, round(spec.layers * width)),
                          heads=heads, ffn_dim=max(8, round(spec.ffn_dim * width)),
                          max_history=spec.max_history, dropout=spec.dropout)
    return None


def large_tables(spec: ModelSpec, rows: int) -> list[str]:
    """Module paths of the tables with at least `rows` rows (each chooses its own dtype)."""
    if isinstance(spec, SasrecSpec):
        return ["embeddings.0" for t in spec.tables if t.name == spec.item_table and t.rows >= rows]
    if isinstance(spec, (DlrmSpec, TwoTowerSpec)):
        return [f"embeddings.{i}" + (".table" if t.multi_hot else "")  # a bag: tasks.modules.bag
                for i, t in enumerate(spec.tables) if t.rows >= rows]
    return []


def suggest(trial: optuna.Trial, space: SearchSpace, spec: ModelSpec,
            tables: list[str]) -> tuple[Candidate, int]:
    """The chain of this trial's choices, and how many of its stages run before the last."""
    stages: list[object] = []
    dim = trial.suggest_categorical("student_dim", space.student_dims)
    if dim:
        width = trial.suggest_categorical("student_width", space.student_widths)
        temperature = trial.suggest_categorical("temperature", space.student_temperatures)
        student = student_spec(spec, dim, width)
        if student is not None:
            stages.append(DistillConfig(student=student, epochs=space.student_epochs,
                                        temperature=temperature))
    sparsity = trial.suggest_categorical("prune", space.prune)
    if sparsity:
        stages.append(PruneConfig(method="structured", sparsity=sparsity))
    rank = trial.suggest_categorical("tt_rank", space.tt_ranks)
    if rank:
        stages.append(FactorizeConfig(target="tt_embeddings", rank=rank, finetune_epochs=2,
                                      finetune_lr=3e-3))
    shared = trial.suggest_categorical(
        "tables", space.small_table_precision if space.per_table else space.table_precision)
    layers = {path: trial.suggest_categorical(f"table:{path}", space.table_precision)
              for path in (tables if space.per_table else [])}
    linear = trial.suggest_categorical("linear", space.linear_precision)
    qat = trial.suggest_categorical("qat", space.qat_epochs)
    tiers = {}
    if any(EMBEDDING[c].head_bits is not None for c in (shared, *layers.values())):
        tiers["head_share"] = trial.suggest_categorical("head_share", space.head_shares)
    stages.append(QuantizeConfig(linear=linear, embeddings=shared, layers=layers,
                                 finetune_epochs=qat, **tiers))
    return Candidate(id=f"trial-{trial.number}", plan=tuple(stages)), len(stages) - 1  # type: ignore[arg-type]


def relative_budget(budget: Budget, main: str, baseline_value: float) -> float:
    """The run's budget on the main metric as a fraction of the baseline's value."""
    rule = budget.metrics.get("main") or budget.metrics.get(main)
    if rule is None:
        return math.inf
    return rule.max_drop if rule.relative else rule.max_drop / max(baseline_value, 1e-12)


@dataclass
class SearchOutcome:
    trials: list[TrialRecord] = field(default_factory=list)
    front: list[TrialRecord] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # every stage built, shared prefixes once
    gpu_s: float = 0.0
    built: set[str] = field(default_factory=set)  # stage keys already counted


def _objectives(search: RecipeSearch, v: Validated) -> list[float]:
    by = {"size": v.size_bytes / v.baseline_bytes,
          "p99": 1.0 / v.p99_ratio if v.p99_ratio else math.inf,
          "quality": v.relative_loss}
    return [by[o] for o in search.objectives]


def _constraints(budget: Budget, search: RecipeSearch, v: Validated,
                 allowed: float) -> dict[str, float]:
    """Optuna constraints (feasible when every value is <= 0): the quality budget's share,
    and the budget's size and latency constraints, measured on the valid split."""
    out = {"quality": v.relative_loss - search.margin * allowed}
    if budget.min_size_ratio is not None:
        out["min_size_ratio"] = budget.min_size_ratio - v.baseline_bytes / v.size_bytes
    if budget.max_size_bytes is not None:
        out["max_size_bytes"] = float(v.size_bytes - budget.max_size_bytes)
    if budget.min_latency_ratio is not None:
        out["min_latency_ratio"] = budget.min_latency_ratio - (v.p99_ratio or 0.0)
    return out


def pareto_front(trials: list[TrialRecord], search: RecipeSearch, objective: str) -> list[TrialRecord]:
    """The feasible trials no other feasible trial beats on size, latency and quality at once,
    best first by the budget's `objective`, at most `search.front`."""
    ok = [t for t in trials if t.feasible and t.validated is not None]

    def point(t: TrialRecord) -> tuple[float, float, float]:
        v = t.validated
        assert v is not None
        return (v.size_bytes / v.baseline_bytes, 1.0 / (v.p99_ratio or 1e-9), v.relative_loss)

    ok = list({t.plan: t for t in reversed(ok)}.values())  # a chain tried twice counts once
    front = [t for t in ok if not any(
        all(a <= b for a, b in zip(point(o), point(t))) and point(o) != point(t) for o in ok)]
    key = {"smallest": lambda t: point(t)[0], "fastest": lambda t: point(t)[1],
           "best_quality": lambda t: point(t)[2]}.get(objective, lambda t: point(t)[0])
    return sorted(front, key=key)[:search.front]


def _sampler(search: RecipeSearch) -> optuna.samplers.BaseSampler:
    """Seeded TPE (one objective) or NSGA-II (several); both read each trial's constraints
    (`Trial.set_constraint`)."""
    if len(search.objectives) == 1:
        return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=min(8, search.trials))
    return optuna.samplers.NSGAIISampler(seed=search.seed,
                                         population_size=max(4, search.parallelism))


def warm_start(graph: Graph, executor: Executor, space: SearchSpace, tables: list[str],
               allowed: float, margin: float) -> dict[str, object] | None:
    """The first trial's choices: the input model's per-table dtypes that mixed precision
    picks from the calibration sensitivity table within the budget's share (no student)."""
    key = graph.calibration
    if key is None:
        return None
    refs = executor.run(graph, [key])[key]
    if isinstance(refs, BaseException):
        return None
    store = getattr(executor, "store", None) or current_store()
    with using_store(store):
        table = pq.read_table(io.BytesIO(current_store().get_blob(refs.sensitivity)))
    choices = set(space.table_precision) | {"none"}
    options: dict[str, list[Option]] = {}
    for r in table.to_pylist():
        if r["module"] in tables and r["choice"] in choices:
            options.setdefault(r["module"], []).append(
                Option(r["choice"], int(r["bytes"]), max(0.0, float(r["relative_loss"]))))
    if not options or any(all(o.choice != "none" for o in opts) for opts in options.values()):
        return None
    picked = assign(options, allowed * margin) if math.isfinite(allowed) else {}
    def pick(choices: tuple[object, ...], plain: object) -> object:
        return plain if plain in choices else choices[0]

    dim = pick(space.student_dims, 0)  # the table is the input model's: keep it if allowed
    params: dict[str, object] = {
        "student_dim": dim, "prune": pick(space.prune, 0.0), "tt_rank": pick(space.tt_ranks, 0),
        "qat": pick(space.qat_epochs, 0), "linear": pick(space.linear_precision, "none"),
        "tables": space.small_table_precision[0]}
    if dim:
        params["student_width"] = max(space.student_widths)
        params["temperature"] = space.student_temperatures[0]
    for path in tables:
        choice = picked.get(path, "none")
        params[f"table:{path}"] = choice if choice in space.table_precision \
            else space.table_precision[0]
    return params if space.per_table else None


def search_recipes(graph: Graph, executor: Executor, executed: Executed,
                   progress: Callable[[float], None] = lambda _: None) -> SearchOutcome:
    """Run the request's recipe search (see the module docstring); the front's trials are
    left as candidates of the graph (`graph.candidates`) for the caller to evaluate on test."""
    r, log = graph.request, executor.log
    search = r.search
    assert search is not None
    spec = resolve(r.model, executed.dataset.spec)
    tables = large_tables(spec, search.space.large_table_rows)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    single = len(search.objectives) == 1
    study = optuna.create_study(
        directions=["minimize"] * len(search.objectives), sampler=_sampler(search),
        pruner=optuna.pruners.ThresholdPruner(upper=math.inf) if single else None)
    outcome, start, asked = SearchOutcome(), time.monotonic(), 0
    allowed: float | None = None
    seen: dict[str, TrialRecord] = {}
    while len(outcome.trials) < search.trials and time.monotonic() - start < search.max_wall_s:
        if allowed is None:  # the budget in relative terms needs the baseline's valid value
            first = graph.validation(graph.baseline, search.proxy_rows)
            v0 = executor.run(graph, [first])[first]
            if isinstance(v0, BaseException):
                raise v0
            allowed = relative_budget(r.budget, MAIN_METRIC[spec.problem_kind()], v0.value)
            if single:
                study.pruner = optuna.pruners.ThresholdPruner(upper=search.prune_at * allowed)
            if search.warm_start:
                params = warm_start(graph, executor, search.space, tables, allowed, search.margin)
                if params is not None:
                    study.enqueue_trial(params, skip_if_exists=True)
        batch = [study.ask() for _ in range(min(search.parallelism,
                                                 search.trials - len(outcome.trials)))]
        _run_batch(graph, executor, study, search, spec, tables, batch, allowed, seen, outcome)
        asked += len(batch)
        if asked >= 4 * search.trials:  # the sampler keeps proposing chains already tried
            log.info("search: stopping after %d proposals (%d distinct chains)", asked,
                     len(outcome.trials))
            break
        progress(100.0 * len(outcome.trials) / search.trials)
        log.info("search: %d/%d trials, %d feasible, %.0fs", len(outcome.trials), search.trials,
                 sum(t.feasible for t in outcome.trials), time.monotonic() - start)
    outcome.wall_s = time.monotonic() - start
    progress(100.0)  # the search is over, whichever limit ended it (trials, proposals, time)
    for t in outcome.trials:
        v = t.validated
        log.info("search trial %d %s: %s%s", t.number, t.state, t.plan, (
            f" | size {v.baseline_bytes / v.size_bytes:.2f}x, valid loss {v.relative_loss:+.5f}, "
            f"p99 {v.p99_ratio or float('nan'):.2f}x, feasible {t.feasible}" if v else "")
            + (f" | {t.why}" if t.why else ""))
    built = executor.run(graph, sorted(outcome.built)) if outcome.built else {}
    stages = [built[k] for k in outcome.built if isinstance(built[k], Built)]
    outcome.cpu_s = sum(b.cpu_s for b in stages)
    outcome.gpu_s = sum(b.wall_s for b in stages if b.device == "cuda")
    outcome.front = pareto_front(outcome.trials, search, r.budget.objective)
    return outcome


def _run_batch(graph: Graph, executor: Executor, study: optuna.Study, search: RecipeSearch,
               spec: ModelSpec, tables: list[str], batch: list[optuna.Trial], allowed: float,
               seen: dict[str, TrialRecord], outcome: SearchOutcome) -> None:
    """Run one batch of trials stage by stage (pruning hopeless prefixes), then tell Optuna."""
    single = len(search.objectives) == 1
    live: dict[int, tuple[optuna.Trial, Candidate, list[str]]] = {}
    again: list[tuple[optuna.Trial, Candidate]] = []  # a chain this batch already runs
    running: set[str] = set()
    for t in batch:
        cand, _ = suggest(t, search.space, spec, tables)
        label = cand.label()
        if label in seen:  # the same chain again: its score is known
            _tell(study, t, seen[label], search, outcome, cand, repeat=True)
            continue
        if label in running:  # told once its twin's score is known, counted once
            again.append((t, cand))
            continue
        running.add(label)
        live[t.number] = (t, cand, graph.add_chain(cand.plan)[0])
    depth = 0
    while live:
        step = {n: keys for n, (_, _, keys) in live.items()}
        final = {n for n, keys in step.items() if depth == len(keys) - 1}
        wanted = {n: graph.validation(keys[depth], None if n in final else search.proxy_rows,
                                      search.latency_seconds if n in final else 0.0)
                  for n, keys in step.items()}
        out = executor.run(graph, list(wanted.values()))
        outcome.built.update(keys[depth] for keys in step.values())
        for n, key in wanted.items():
            trial, cand, keys = live[n]
            v = out[key]
            if isinstance(v, BaseException):
                record = TrialRecord(number=trial.number, plan=cand.label(), state="failed",
                               why=f"{type(v).__name__}: {v}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                outcome.trials.append(record)
                seen[cand.label()] = record
                del live[n]
                continue
            if n in final:
                del live[n]
                record = _scored(graph, executor, trial, cand, keys, v, search, allowed)
                seen[cand.label()] = record
                _tell(study, trial, record, search, outcome, cand)
                continue
            if single:
                trial.report(v.relative_loss, depth)
            if (trial.should_prune() if single else v.relative_loss > search.prune_at * allowed):
                record = TrialRecord(number=trial.number, plan=cand.label(), state="pruned",
                               validated=v, why=f"after stage {depth + 1}: valid-subset loss "
                               f"{v.relative_loss:.5f} > {search.prune_at:g} x budget")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                outcome.trials.append(record)
                seen[cand.label()] = record
                del live[n]
        depth += 1
    for t, cand in again:
        _tell(study, t, seen[cand.label()], search, outcome, cand, repeat=True)


def _scored(graph: Graph, executor: Executor, trial: optuna.Trial, cand: Candidate,
            keys: list[str], v: Validated, search: RecipeSearch, allowed: float) -> TrialRecord:
    r = graph.request
    built = executor.run(graph, keys)
    stages = [built[k] for k in keys if not isinstance(built[k], BaseException)]
    cpu = sum(b.cpu_s for b in stages)
    gpu = sum(b.wall_s for b in stages if b.device == "cuda")
    cons = _constraints(r.budget, search, v, allowed)
    return TrialRecord(number=trial.number, plan=cand.label(), validated=v, candidate=cand,
                       feasible=all(c <= 0 for c in cons.values()), cpu_s=cpu, gpu_s=gpu,
                       constraints=cons)


def _tell(study: optuna.Study, trial: optuna.Trial, known: TrialRecord, search: RecipeSearch,
          outcome: SearchOutcome, cand: Candidate, repeat: bool = False) -> None:
    """Tell Optuna the trial's score; a chain already tried (`repeat`) is told its known score
    but not counted again against the trial budget."""
    record = known.model_copy(update={"number": trial.number})
    if known.state != "complete" or known.validated is None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if known.state == "pruned"
                   else optuna.trial.TrialState.FAIL)
    else:
        for name, value in known.constraints.items():
            trial.set_constraint(name, value)
        values = _objectives(search, known.validated)
        study.tell(trial, values[0] if len(values) == 1 else values)
    if repeat:
        return
    if record.candidate is not None:
        record = record.model_copy(update={"candidate": cand.model_copy(
            update={"id": f"trial-{trial.number}"})})
    outcome.trials.append(record)


def run_search(graph: Graph, executor: Executor, executed: Executed,
               progress: Callable[[float], None] = lambda _: None) -> SearchReport:
    """The search, then its front as candidates ``search-1``, ``search-2``, ... evaluated on
    the test split like every candidate (their results join `executed.results`)."""
    from tasks.execute import collect, wanted

    outcome = search_recipes(graph, executor, executed, progress)
    ids = []
    for i, trial in enumerate(outcome.front, 1):
        assert trial.candidate is not None
        cid = f"search-{i}" if f"search-{i}" not in graph.candidates else f"search-{i}-t{trial.number}"
        graph.add_candidate(trial.candidate.model_copy(update={"id": cid}))
        ids.append(cid)
    if ids:
        collect(graph, executor.run(graph, wanted(graph, ids)), ids, executed, executor.log)
    executor.log.info("search: %d trials in %.0fs; front sent to the gate: %s",
                      len(outcome.trials), outcome.wall_s, ids)
    search = graph.request.search
    assert search is not None
    return SearchReport(objectives=search.objectives, trials=tuple(outcome.trials),
                        front=tuple(ids), wall_s=outcome.wall_s,
                        cpu_s=outcome.cpu_s, gpu_s=outcome.gpu_s)
