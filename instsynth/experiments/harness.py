"""An experiment from start to table: prepare every arm, train every unfinished run, write results.json and results.md."""
from __future__ import annotations



from instsynth.core.io import InstSynthError, get_logger, write_bytes, write_json
from instsynth.experiments.arms import ArmData, Preparer
from instsynth.experiments.config import Experiment, PREPARED_FILE
from instsynth.experiments.runs import run_specs, run_state, train_all
from instsynth.experiments.table import collect_results, format_results

log = get_logger("instsynth.experiment")


# --------------------------------------------------------------------------- entry point
def run_experiment(exp: Experiment, arms: list[str] | None = None, prepare_only: bool = False,
                   table_only: bool = False) -> dict:
    """Prepare the data of every arm, train every unfinished (arm, seed), write and return the results."""
    chosen = [a for a in exp.arms if arms is None or a.name in arms]
    unknown = sorted(set(arms or ()) - {a.name for a in exp.arms})
    if unknown:
        raise InstSynthError(exp.path, f"unknown arm(s) {unknown}; arms: {[a.name for a in exp.arms]}")
    out = exp.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if table_only:
        data = {a.name: ArmData.load(a.name, out / "data" / a.name / PREPARED_FILE)
                for a in exp.arms if (out / "data" / a.name / PREPARED_FILE).is_file()}
        chosen = [a for a in chosen if a.name in data]
    else:
        chained = {a.name for a in exp.arms if a.spec.get("budget_from_baseline")}
        waiting = [a for a in chosen if a.name in chained or a.spec.get("match") in chained]
        preparer = Preparer(exp)
        data = preparer.prepare([a for a in chosen if a not in waiting])
        if waiting and not prepare_only:  # the baseline's first seed, then the arms budgeted from its AP
            first = [s for s in run_specs(exp, [a for a in exp.arms if a.name == exp.baseline], data)
                     if s.seed == exp.seeds[0]]
            train_all(exp, first, data)
            data = preparer.prepare(chosen)
        elif waiting:
            log.info("prepare only: arms %s wait for the baseline's AP", [a.name for a in waiting])
        data.update({a.name: ArmData.load(a.name, out / "data" / a.name / PREPARED_FILE) for a in exp.arms
                     if a.name not in data and (out / "data" / a.name / PREPARED_FILE).is_file()})  # for the table
    specs = run_specs(exp, [a for a in exp.arms if a.name in data], data)
    counts = {"trained": 0, "skipped": 0}
    if table_only:
        counts["skipped"] = sum(bool(run_state(s).get("done")) for s in specs)  # the runs the table holds
    elif not prepare_only:
        counts = train_all(exp, [s for s in specs if s.arm in {a.name for a in chosen}], data)
    results = {**collect_results(exp, specs, data), "runs": counts}
    write_json(out / "results.json", results)
    write_bytes(out / "results.md", format_results(results).encode())
    return results
