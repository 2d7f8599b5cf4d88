"""One load-test run from end to end: build the trace, drive it, write the three outputs.

Owns: `LoadRun` (everything that defines a run) and `execute`, which writes
`<out>/<label>.json` (per-request records), `<out>/<label>.md` (the summary) and the PNG plots.
Both the `python -m loadtest` command and the benchmark suite go through here.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.client import ClientConfig
from loadtest.driver import drive
from loadtest.plots import plot_run, slug
from loadtest.records import RequestRecord, RunInfo, save_run
from loadtest.summary import Summary, summarize, to_markdown
from loadtest.trace import TraceConfig, build_trace


@dataclass(frozen=True)
class LoadRun:
    """A run: a trace, a server, how to drive it, and where to write.

    Args:
        label: names the output files and titles.
        trace: the workload (its `rate` set means open loop).
        client: the server and request settings.
        concurrency: clients of a closed loop; must be None when `trace.rate` is set.
        max_seconds: the run's time bound.
        out_dir: where the JSON, Markdown and plots go; None writes nothing.
        plots: whether to draw the PNGs.
        quiet: hide the progress bar.
    """

    label: str
    trace: TraceConfig
    client: ClientConfig
    concurrency: int | None = None
    max_seconds: float = 600.0
    out_dir: Path | None = None
    plots: bool = True
    quiet: bool = False

    def __post_init__(self):
        if (self.trace.rate is None) == (self.concurrency is None):
            raise ValueError("set exactly one of a rate (open loop) and a concurrency (closed loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")

    def info(self) -> RunInfo:
        return RunInfo(
            label=self.label,
            base_url=self.client.base_url,
            mode="closed" if self.concurrency is not None else "open",
            rate=self.trace.rate,
            cv=self.trace.cv,
            concurrency=self.concurrency,
            num_adapters=len(self.trace.adapters),
            alpha=self.trace.alpha,
            max_requests=self.trace.num_requests,
            max_seconds=self.max_seconds,
            seed=self.trace.seed,
        )


def execute(load: LoadRun) -> tuple[Summary, list[RequestRecord]]:
    """Run `load` and write its outputs; returns the summary and the records."""
    specs = build_trace(load.trace)
    records, duration = drive(specs, load.client, load.max_seconds, load.concurrency, load.label, load.quiet)
    info = replace(load.info(), duration=duration)
    summary = summarize(info, records)
    if load.out_dir is not None:
        load.out_dir.mkdir(parents=True, exist_ok=True)
        stem = slug(load.label)
        save_run(load.out_dir / f"{stem}.json", info, records)
        (load.out_dir / f"{stem}.md").write_text(to_markdown(summary))
        if load.plots:
            plot_run(info, records, load.out_dir)
    return summary, records
