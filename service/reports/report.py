"""`barlow report RUN_URL`: one self-contained HTML page of a run, finished, running or resumed, local or remote.

The page holds the loss and its two terms, both learning rates, the kNN curve, throughput and data wait, peak
memory, the collapse signal, the run's events (checkpoint saves, starts and resumes, world-size changes,
pre-emptions) on the loss's step axis and on a wall-clock timeline, the newest cross-correlation image, and the
spec. Figures are inline SVG drawn by matplotlib; nothing is fetched when the page is viewed. Beside each figure a
`<script type="application/json" class="figure-data">` holds exactly the series it plots, for whoever wants the
numbers (and for the tests, which compare them with stats.txt).

What the run folder holds is read as others may have written it: stats.txt as run_log reads it, spec.yaml within
the spec's size and with its bounded YAML loader, the event files only under names this project writes, within
MAX_EVENT_FILES and MAX_EVENT_BYTES, each record within MAX_RECORD_BYTES, the image within MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # protobuf ships no types
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from service.checkpoint.catalog import CheckpointInfo, list_checkpoints
from service.errors import SpecError, StorageError
from service.method.model import BACKBONE_FEATURES
from service.observe.stats import CORRELATION_TAG
from service.observe.tensorboard import EVENT_FILES, FOLDER, NEGATIVE, POSITIVE, ZERO
from service.reports.health import AttemptHealth, judge, rate
from service.reports.run_log import RunLog, read_run_log
from service.run.layout import SPEC, under
from service.spec import MAX_SPEC_BYTES, StorageSpec, safe_yaml
from service.storage.filesystem import filesystem, require_exists
from service.storage.untrusted import MiB, UntrustedObject, checked_name, read_bounded

log = logging.getLogger("barlow")

EVENT_STYLE = {"start": ("tab:green", "-"), "resume": ("tab:green", "-"), "checkpoint": ("0.6", ":"),
               "preempted": ("tab:red", "--"), "diverged": ("tab:red", "-"), "world size": ("tab:purple", "-"),
               "end": ("black", "-")}
# A run's event files: ~1 KB of scalars a logged step and a 64 x 64 PNG every run.image_every steps, in one file
# per upload (every run.sync_every_seconds, 5 min): 1000 ImageNet epochs write tens of MB in a few thousand files
MAX_EVENT_FILES = 50_000
MAX_EVENT_BYTES = 256 * MiB
MAX_RECORD_BYTES = 16 * MiB  # TensorBoard's reader allocates what a record declares before reading it
MAX_IMAGE_PIXELS = 1024 * 1024  # the image drawn is 64 x 64


def write_report(run: str, output: str, storage: StorageSpec) -> str:
    """Write the run's report to `output` (a path or URL); returns the line the CLI prints."""
    run = run.rstrip("/")
    log = read_run_log(run, storage)
    if log is None:
        require_exists(run, storage)  # a missing bucket or folder says so first
        raise StorageError(f"{run}: no stats.txt here: is it a run's output (run.output)?")
    spec_text = _read_text(under(run, SPEC), storage)
    checkpoints = [c for c in list_checkpoints(run, storage) if c.valid]
    image = _newest_correlation_image(run, storage)
    events = _events(log)
    width, features = _model_shape(spec_text, under(run, SPEC))
    figures = _figures(log, events, width, image, run)
    page = _page(run, log, events, spec_text, checkpoints, figures, judge(log, width, features))
    fs, path = filesystem(output, storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as file:
        file.write(page)
    return f"wrote {output}: {len(figures)} figures of {run} ({_progress(log)})"


def _read_text(url: str, storage: StorageSpec) -> str | None:
    """The spec's text, within MAX_SPEC_BYTES (UntrustedObject beyond); None when there is none."""
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        return None
    return read_bounded(fs, path, MAX_SPEC_BYTES, "spec").decode(errors="replace")


def _event_files(fs, path: str, where: str) -> dict[str, str]:
    """{local name: remote path} of the run's event files: names of the form this project writes (UntrustedObject
    naming the first that is not), at most MAX_EVENT_FILES of MAX_EVENT_BYTES in all."""
    found = fs.glob(f"{path}/{EVENT_FILES}", detail=True)
    if len(found) > MAX_EVENT_FILES:
        raise UntrustedObject(f"{where}: {len(found):,} event files, more than a run writes (at most "
                              f"{MAX_EVENT_FILES:,}): not read")
    total = sum(int(info.get("size") or 0) for info in found.values())
    if total > MAX_EVENT_BYTES:
        raise UntrustedObject(f"{where}: {total:,} bytes of event files, more than a run writes (at most "
                              f"{MAX_EVENT_BYTES:,}): not read")
    return {checked_name(name.rstrip("/").rsplit("/", 1)[-1], where): name for name in found}


def check_records(path: Path, where: str) -> None:
    """UntrustedObject unless every record of the event file at `path` declares at most MAX_RECORD_BYTES (a
    record is an 8-byte length, its 4-byte CRC, the data and the data's CRC). A record cut short, as in a file
    still being written, ends the check: TensorBoard's reader stops there too."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        position = 0
        while len(header := file.read(8)) == 8:
            (length,) = struct.unpack("<Q", header)
            if length > MAX_RECORD_BYTES:
                raise UntrustedObject(f"{where}: a record of {length:,} bytes at byte {position:,}, more than an "
                                      f"event holds (at most {MAX_RECORD_BYTES:,}): not TensorBoard's")
            position += 16 + length
            if position > size:
                break
            file.seek(position)


def _newest_correlation_image(run: str, storage: StorageSpec) -> tuple[int, bytes] | None:
    """(step, PNG bytes) of the newest cross-correlation image in the run's event files, read with TensorBoard's
    EventAccumulator (which drops the events a resumed run purged), each file checked first (check_records)."""
    fs, path = filesystem(f"{run}/{FOLDER}", storage)
    if not fs.exists(path):
        return None
    with tempfile.TemporaryDirectory(prefix="barlow-report-") as folder:
        for name, remote in _event_files(fs, path, f"{run}/{FOLDER}").items():
            fs.get_file(remote, str(Path(folder) / name))
            check_records(Path(folder) / name, f"{run}/{FOLDER}/{name}")
        accumulator = EventAccumulator(folder, size_guidance={IMAGES: 0})  # all: a resume's purge may drop the last
        try:
            accumulator.Reload()
        except DecodeError as error:
            raise UntrustedObject(f"{run}/{FOLDER}: an event file holds a record that is not an event ({error})"
                                  ) from None
        images = accumulator.Images(CORRELATION_TAG) if CORRELATION_TAG in accumulator.Tags()[IMAGES] else []
        newest = max(images, key=lambda event: event.step, default=None)  # none when a resume purged them all
        return None if newest is None else (newest.step, newest.encoded_image_string)


def _series(lines: list[dict[str, Any]], field: str) -> dict[str, list]:
    kept = [line for line in lines if line.get(field) is not None]
    return {"x": [line["step"] for line in kept], "y": [line[field] for line in kept]}


def _events(log: RunLog) -> list[dict[str, Any]]:
    """The run's events to mark: starts (resumes after the first), world-size changes, saves, pre-emptions, ends."""
    marks, world = [], None
    for event in log.events:
        kind = event["event"]
        if kind == "start":
            if world is not None and event.get("world_size") != world:
                kind = "world size"
            elif world is not None or event["step"]:
                kind = "resume"
            world = event.get("world_size")
        label = f"{kind} at step {event['step']}" + (f" on {world} workers" if kind in ("start", "resume",
                                                                                       "world size") else "")
        marks.append({"kind": kind, "step": event["step"], "wall": log.wall_clock(event), "label": label})
    return marks


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    # no metadata: its date and RDF namespace URLs are noise in a page
    figure.savefig(buffer, format="svg", bbox_inches="tight",
                   metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # the XML prolog and doctype do not belong inside HTML


def _curve(title: str, ylabel: str, series: dict[str, dict[str, list]], events: list[dict[str, Any]],
           log_scale: bool = False, reference: tuple[str, float] | None = None) -> Figure:
    figure = Figure(figsize=(9, 3.4))
    axes = figure.add_subplot()
    for name, points in series.items():
        axes.plot(points["x"], points["y"], label=name, marker="." if len(points["x"]) < 40 else None)
    if reference is not None:
        axes.axhline(reference[1], color="0.4", linestyle="--", label=reference[0])
    for event in events:
        color, style = EVENT_STYLE[event["kind"]]
        axes.axvline(event["step"], color=color, linestyle=style, linewidth=1)
    if log_scale and all(value > 0 for points in series.values() for value in points["y"]):
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="best", fontsize="small")
    return figure


def _throughput(series: dict[str, dict[str, list]], events: list[dict[str, Any]]) -> Figure:
    figure = _curve("throughput", "images/s", {"images_per_s": series["images_per_s"]}, events)
    axes = figure.axes[0]
    wait = axes.twinx()
    wait.plot(series["data_wait"]["x"], series["data_wait"]["y"], color="tab:orange", label="data_wait")
    wait.set_ylim(0, 1)
    wait.set_ylabel("fraction of step time waiting for data")
    wait.legend(loc="lower right", fontsize="small")
    return figure


def _timeline(log: RunLog, events: list[dict[str, Any]]) -> tuple[Figure, dict[str, Any]]:
    """Wall-clock time against step: a gap between a pre-emption and its resume shows as a flat stretch."""
    walls = [(log.wall_clock(line), line["step"]) for line in log.steps]
    timed = [(wall, step) for wall, step in walls if wall is not None]
    marks = [event for event in events if event["wall"] is not None]
    origin = min((start["wall"] for start in log.starts if start.get("wall") is not None), default=0.0)
    unit, seconds = _time_unit(max([wall for wall, _ in timed] + [event["wall"] for event in marks], default=origin)
                               - origin)
    times = [(wall - origin) / seconds for wall, _ in timed]
    figure = Figure(figsize=(9, 3.4))
    axes = figure.add_subplot()
    axes.plot(times, [step for _, step in timed], marker=".", label="logged step")
    shown = set()
    for event in marks:
        axes.scatter([(event["wall"] - origin) / seconds], [event["step"]], color=EVENT_STYLE[event["kind"]][0],
                     zorder=3, label=None if event["kind"] in shown else event["kind"])
        shown.add(event["kind"])
    axes.set_title("timeline")
    axes.set_xlabel(f"{unit} since {_utc(origin)}")
    axes.set_ylabel("step")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return figure, {"series": {"step": {"x": times, "y": [step for _, step in timed]}}, "events": marks,
                    "origin": origin, "unit": unit}


def _time_unit(span_s: float) -> tuple[str, float]:
    """The unit, and its seconds, that shows a span of `span_s` seconds in readable numbers."""
    return ("seconds", 1.0) if span_s < 120 else ("minutes", 60.0) if span_s < 7200 else ("hours", 3600.0)


def _pixels(png: bytes, where: str) -> np.ndarray:
    """The image's RGB pixels; UntrustedObject when it is not an image of at most MAX_IMAGE_PIXELS."""
    try:
        with Image.open(io.BytesIO(png)) as picture:
            if picture.width * picture.height > MAX_IMAGE_PIXELS:
                raise UntrustedObject(f"{where}: a {picture.width} x {picture.height} image, more than this project "
                                      f"draws (at most {MAX_IMAGE_PIXELS:,} pixels): not read")
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise UntrustedObject(f"{where}: the cross-correlation image is not an image ({error})") from None


def _heatmap(image: tuple[int, bytes], where: str) -> tuple[Figure, dict[str, Any]]:
    step, png = image
    pixels = _pixels(png, where)
    figure = Figure(figsize=(5.2, 4.4))
    axes = figure.add_subplot()
    axes.imshow(pixels, interpolation="nearest")
    colors = LinearSegmentedColormap.from_list(
        "correlation", [np.array(color) / 255 for color in (NEGATIVE, ZERO, POSITIVE)])
    figure.colorbar(ScalarMappable(Normalize(-1, 1), colors), ax=axes, label="C_ij")
    axes.set_title(f"cross-correlation at step {step} ({pixels.shape[0]} x {pixels.shape[1]})")
    axes.set_xlabel("dimension j (every D/64-th)")
    axes.set_ylabel("dimension i")
    data = {"step": step, "shape": list(pixels.shape), "png_base64": base64.b64encode(png).decode()}
    return figure, data


def _model_shape(spec_text: str | None, where: str) -> tuple[int | None, int | None]:
    """(D, the projector's output width, from the spec's model.projector "8192-8192-8192"; the backbone's feature
    dimension from model.backbone): None where the spec has none (an evaluation's), and, with a warning, where the
    spec is not one."""
    if not spec_text:
        return None, None
    try:
        spec = safe_yaml(spec_text, where)
    except SpecError as error:
        log.warning("%s; the collapse figure and the health section are drawn without the model's widths", error)
        return None, None
    model = spec.get("model", {}) if isinstance(spec, dict) else None
    projector = model.get("projector") if isinstance(model, dict) else ""  # no mapping: warned of below
    backbone = model.get("backbone") if isinstance(model, dict) else None
    features = BACKBONE_FEATURES.get(backbone) if isinstance(backbone, str) else None
    if projector is None:
        return None, features
    if not (isinstance(projector, str) and re.fullmatch(r"[1-9][0-9]{0,6}(-[1-9][0-9]{0,6})*", projector)):
        log.warning("%s: not a spec with a model.projector of widths; the collapse figure is drawn without "
                    "1/sqrt(D)", where)
        return None, features
    return int(projector.rsplit("-", 1)[-1]), features


def _figures(log: RunLog, events: list[dict[str, Any]], width: int | None,
             image: tuple[int, bytes] | None, run: str) -> list[dict[str, Any]]:
    """(name, title, svg, data) of every figure, in the page's order."""
    step_events = [event for event in events if event["kind"] != "end"]
    series = {field: _series(log.steps, field) for field in (
        "loss", "loss_on_diag", "loss_off_diag", "lr_weights", "lr_biases", "images_per_s", "data_wait",
        "peak_memory_gib", "embedding_std", "step_time")}
    plots: list[tuple[str, str, Figure, dict[str, Any]]] = []

    def curve(name: str, title: str, fields: list[str], ylabel: str, **options) -> None:
        chosen = {field: series[field] for field in fields}
        plots.append((name, title, _curve(title, ylabel, chosen, step_events, **options),
                      {"series": chosen, "events": step_events}))

    curve("loss", "loss and its two terms", ["loss", "loss_on_diag", "loss_off_diag"], "loss", log_scale=True)
    curve("lr", "learning rates", ["lr_weights", "lr_biases"], "learning rate")
    knn = {"knn_top1": _series(log.knn, "knn_top1")}
    plots.append(("knn", "kNN monitor", _curve("kNN monitor (top-1 %)", "top-1 %", knn, step_events),
                  {"series": knn, "events": step_events}))
    throughput = {field: series[field] for field in ("images_per_s", "data_wait")}
    plots.append(("throughput", "throughput and data wait", _throughput(series, step_events),
                  {"series": throughput, "events": step_events}))
    curve("memory", "peak memory", ["peak_memory_gib"], "GiB")
    reference = (f"1/sqrt(D) = {1 / math.sqrt(width):.4f}", 1 / math.sqrt(width)) if width else None
    curve("collapse", "collapse signal", ["embedding_std"], "std of L2-normalised embeddings",
          reference=reference)
    timeline, timeline_data = _timeline(log, events)
    plots.append(("timeline", "timeline", timeline, timeline_data))
    if image is not None:
        heatmap, heatmap_data = _heatmap(image, f"{run}/{FOLDER}")
        plots.append(("correlation", "cross-correlation", heatmap, heatmap_data))
    return [{"name": name, "title": title, "svg": _svg(figure), "data": data} for name, title, figure, data in plots]


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _progress(log: RunLog) -> str:
    """Steps done of the total, and the last logged loss (a logged step's `step` is the step it trained, an event's the
    steps done before it)."""
    last = log.last_step
    done = max([event["step"] for event in log.events[-1:]] + ([last["step"] + 1] if last else []), default=0)
    total = log.starts[-1].get("total_steps") if log.starts else None
    loss = f"loss {last['loss']:.6g} at step {last['step']}" if last else "no step logged yet"
    return f"{done} of {total if total is not None else '?'} steps done, {loss}"


def _page(run: str, log: RunLog, events: list[dict[str, Any]], spec_text: str | None,
          checkpoints: list[CheckpointInfo], figures: list[dict[str, Any]], health: list[AttemptHealth]) -> str:
    newest = checkpoints[-1] if checkpoints else None
    ended = bool(log.events) and log.events[-1]["event"] == "end"
    knn = log.knn[-1]["knn_top1"] if log.knn else None
    verdict = f"{health[-1].verdict} ({health[-1].reason})" if health else "no attempt yet"
    facts = [
        ("state", "finished" if ended else f"not finished (last event: {log.events[-1]['event']})"
         if log.events else "no event yet"),
        ("steps", _progress(log)), ("rate", rate(log)), ("verdict", verdict), ("run", run),
        ("kNN top-1", f"{knn:.2f} %" if knn is not None else "-"),
        ("newest checkpoint", f"{newest.url} ({(newest.manifest or {}).get('created', '-')})" if newest else "none"),
        ("attempts", f"{len(log.starts)} (world sizes {', '.join(str(s.get('world_size')) for s in log.starts)})"),
        ("written", _utc(datetime.now(timezone.utc).timestamp())),
    ]
    rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>" for key, value in facts)
    event_rows = "".join(
        f"<tr><td>{html.escape(time)}</td><td>{html.escape(kind)}</td><td>{html.escape(steps)}</td>"
        f"<td>{html.escape(label)}</td></tr>" for time, kind, steps, label in _event_rows(events))
    sections = "".join(
        f'<figure id="fig-{figure["name"]}"><figcaption>{html.escape(figure["title"])}</figcaption>{figure["svg"]}'
        f'<script type="application/json" class="figure-data" data-figure="{figure["name"]}">'
        f'{_json_for_script(figure["data"])}</script></figure>' for figure in figures)
    if not any(figure["name"] == "correlation" for figure in figures):
        sections += '<p id="no-correlation">No cross-correlation image yet (run.tensorboard and run.image_every).</p>'
    spec = html.escape(spec_text) if spec_text else "no spec.yaml in the run's output"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Barlow Twins run {html.escape(run)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }} th, td {{ text-align: left; padding: 2px 10px; }}
tbody tr:nth-child(odd) {{ background: #f4f4f4; }} figure {{ margin: 1.5em 0; }}
figcaption {{ font-weight: bold; }} svg {{ max-width: 100%; height: auto; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
.verdict {{ font-weight: bold; }} .healthy {{ color: #1a7f37; }} .watch, .no-signal-yet {{ color: #9a6700; }}
.dimensional-collapse, .complete-collapse, .diverged {{ color: #cf222e; }}
</style></head><body>
<h1>Barlow Twins run</h1>
<table id="summary">{rows}</table>
{_health_section(health)}
{sections}
<h2>Events</h2>
<table id="events"><thead><tr><th>time</th><th>event</th><th>step</th><th></th></tr></thead>
<tbody>{event_rows}</tbody></table>
<h2>Spec</h2>
<pre id="spec">{spec}</pre>
</body></html>
"""


def _css_class(verdict: str) -> str:
    return verdict.replace(" ", "-")


def _health_section(health: list[AttemptHealth]) -> str:
    """Each attempt's verdict and its signals against what a healthy and a collapsing run show (health.py)."""
    parts = ['<section id="health"><h2>Health</h2><p>Label-free signals of collapse, from each attempt\'s last '
             "logged step and last kNN monitor pass. Complete collapse: every input near one point; dimensional "
             "collapse: the features fill only a few of their dimensions.</p>"]
    for attempt in health:
        steps = f"steps {attempt.steps[0]}-{attempt.steps[1]}" if attempt.steps else "no logged step"
        workers = "" if attempt.world_size is None else (
            f", {attempt.world_size} worker{'s' if attempt.world_size != 1 else ''}")
        parts.append(
            f'<h3 class="attempt">attempt {attempt.number} ({steps}{workers}): <span class="verdict '
            f'{_css_class(attempt.verdict)}">{html.escape(attempt.verdict)}</span></h3>'
            f"<p>{html.escape(attempt.reason)}</p>"
            "<table class=\"signals\"><thead><tr><th>signal</th><th>this attempt</th><th>healthy</th>"
            "<th>collapsing</th><th>judged</th></tr></thead><tbody>" + "".join(
                f"<tr><td>{html.escape(signal.name)}</td><td>{html.escape(signal.value)}</td>"
                f"<td>{html.escape(signal.healthy)}</td><td>{html.escape(signal.collapsing)}</td>"
                f'<td class="{_css_class(signal.state)}">{html.escape(signal.state or "shown, not judged")}</td></tr>'
                for signal in attempt.signals) + "</tbody></table>")
    data = [{"attempt": a.number, "verdict": a.verdict, "reason": a.reason, "steps": a.steps,
             "world_size": a.world_size, "signals": [vars(signal) for signal in a.signals]} for a in health]
    parts.append(f'<script type="application/json" id="health-data">{_json_for_script(data)}</script></section>')
    return "".join(parts)


def _event_rows(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(time, event, step, label) rows, each run of consecutive checkpoint saves folded into one row with its count:
    they are routine, and most of a long run's events."""
    rows: list[tuple[str, str, str, str]] = []
    saves: list[dict[str, Any]] = []

    def fold() -> None:
        if len(saves) == 1:
            rows.append((_utc(saves[0]["wall"]), "checkpoint", str(saves[0]["step"]), saves[0]["label"]))
        elif saves:
            first, last = saves[0], saves[-1]
            rows.append((f"{_utc(first['wall'])} - {_utc(last['wall'])}", f"checkpoint x {len(saves)}",
                         f"{first['step']}-{last['step']}", f"{len(saves)} checkpoints saved, steps "
                         + ", ".join(str(save["step"]) for save in saves[:20]) + (", ..." if len(saves) > 20 else "")))
        saves.clear()

    for event in events:
        if event["kind"] == "checkpoint":
            saves.append(event)
            continue
        fold()
        rows.append((_utc(event["wall"]), event["kind"], str(event["step"]), event["label"]))
    fold()
    return rows


def _json_for_script(data: Any) -> str:
    """JSON that cannot close its <script> element early."""
    return json.dumps(data).replace("</", "<\\/")
