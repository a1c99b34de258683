"""Ray itself and what it can run: the lazy import, starting or reaching Ray, and the CPUs/GPUs each trial gets.

Nothing here imports Ray at import time: :func:`import_ray` does, when an entry needs it, and turns its absence
into one :class:`FastlesionError` line (:data:`INSTALL_HINT`).

A local Ray started here is recorded in a marker file (:func:`local_ray_marker`: this machine's name and the
driver's pid, the processes Ray started and its session folder), removed again when the search shuts Ray down. A
driver killed with ``kill -9`` leaves its marker behind, and some of its Ray processes (agents, trial workers)
keep running; the next local start finds them (:func:`find_leftover_rays`) and stops them
(:func:`stop_leftover_rays`). Only processes of such a marker whose driver is gone are touched, each recognised by
its pid and start time, or as a Ray process writing into that session's folder: a Ray started by ``ray start``, by
another program or by a fastlesion search still running is never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlesion.errors import FastlesionError
from fastlesion.tune.settings import TuneSettings

INSTALL_HINT = "Ray Tune is not installed: pip install 'ray[tune]'"
log = logging.getLogger(__name__)


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.tune)``, or a :class:`FastlesionError` saying how to install Ray Tune."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise FastlesionError(INSTALL_HINT) from e
    return ray, tune


def local_resources() -> dict[str, float]:
    """What ``ray.init()`` gets on this machine: every core and every visible GPU."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_resources(ray: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(total, largest node) CPUs and GPUs of the connected Ray cluster."""
    total = {k: float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU")}
    largest = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", True)):
            res = node.get("Resources", {})
            for k in largest:
                largest[k] = max(largest[k], float(res.get(k, 0)))
    return total, largest


def resolve_resources(settings: TuneSettings, total: dict[str, float], largest: dict[str, float] | None = None,
                      where: str = "this machine") -> tuple[float, float]:
    """(gpus_per_trial, cpus_per_trial) with the defaults filled in; an error when no node can run a trial.

    A trial that asks for more than the largest node has would stay PENDING forever, so that is refused here.
    """
    largest = largest or total
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    g = settings.gpus_per_trial if settings.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    if g > largest.get("GPU", 0.0):
        have = f"{largest.get('GPU', 0.0):g} GPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--gpus-per-trial {g:g} but {where} has {have}; "
                              + ("use --gpus-per-trial 0 to run the trials on CPUs" if gpus == 0 else
                                 "ask for fewer GPUs per trial"))
    if settings.cpus_per_trial is not None:
        c = float(settings.cpus_per_trial)
    elif g > 0:
        c = float(max(1, int(cpus // max(1, int(gpus // g)))))
    else:
        c = 1.0
    if c > largest.get("CPU", 0.0):
        have = f"{largest.get('CPU', 0.0):g} CPU(s)" + (" on its largest node" if largest != total else "")
        raise FastlesionError(f"--cpus-per-trial {c:g} but {where} has {have}; ask for fewer CPUs per trial")
    return g, c


def concurrency(total: dict[str, float], gpus_per_trial: float, cpus_per_trial: float) -> int:
    """How many trials the resources let run at once."""
    n = int(total.get("CPU", 0) // cpus_per_trial)
    if gpus_per_trial > 0:
        n = min(n, int(total.get("GPU", 0) // gpus_per_trial + 1e-9))
    return max(n, 0)


# --------------------------------------------------------------------------------------------------- leftovers
LOCAL_RAY_DIR = "local-ray"
"""Folder of the cache (``$FASTLESION_CACHE`` or ``~/.cache/fastlesion``) holding the local Ray markers."""


def local_ray_dir() -> Path:
    """Where the markers of the local Rays started by fastlesion searches live: ``<cache>/local-ray``."""
    from fastlesion.data.catalog import cache_dir

    return cache_dir() / LOCAL_RAY_DIR


def local_ray_marker(directory: str | Path | None = None, pid: int | None = None) -> Path:
    """The marker file of the local Ray started by process ``pid`` (default: this one) on this machine."""
    return Path(directory or local_ray_dir()) / f"{socket.gethostname()}-{pid or os.getpid()}.json"


def _psutil() -> Any:
    """psutil, which Ray ships (in ``ray/thirdparty_files``, on the path once Ray is imported); None without Ray."""
    try:
        import_ray()
        import psutil
    except (FastlesionError, ImportError):
        return None
    return psutil


def _process(pid: int, create_time: float) -> Any:
    """The running process ``pid`` if it is the one that started at ``create_time`` (not a reused pid), else None."""
    psutil = _psutil()
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(create_time)) > 1.0 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.Error, ValueError, TypeError):
        return None


def _identity(p: Any) -> dict[str, Any]:
    return {"pid": p.pid, "create_time": p.create_time(), "name": p.name()}


def _session_dir(ray: Any, processes: list[Any]) -> str | None:
    """Ray's session folder (``/tmp/ray/session_<time>_<pid>``): from Ray, else from its processes' arguments."""
    try:
        return str(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a private API: fall back to the command lines
        pass
    for p in processes:
        try:
            for arg in p.cmdline():
                if arg.startswith("--session-dir="):
                    return arg.split("=", 1)[1]
        except Exception:  # noqa: BLE001
            continue
    return None


def write_local_ray_marker(ray: Any, directory: str | Path | None = None) -> Path | None:
    """Record the local Ray this process just started (see the module docstring); None when it cannot be written
    (a read-only cache never stops a search)."""
    psutil = _psutil()
    if psutil is None:
        return None
    try:
        me = psutil.Process()
        ray_dir = _ray_package_dir()
        children = [p for p in me.children(recursive=True) if _is_ray_process(p, ray_dir)]
        marker = {
            "host": socket.gethostname(), "boot_time": psutil.boot_time(),
            "driver": _identity(me), "session_dir": _session_dir(ray, children),
            "processes": [_identity(p) for p in children if p.is_running()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        path = local_ray_marker(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, path)
        return path
    except Exception as e:  # noqa: BLE001 - bookkeeping only
        log.debug("cannot write the local Ray marker: %s", e)
        return None


def remove_local_ray_marker(directory: str | Path | None = None) -> None:
    """Forget this process's local Ray (it was shut down)."""
    try:
        local_ray_marker(directory).unlink(missing_ok=True)
    except OSError as e:
        log.debug("cannot remove the local Ray marker: %s", e)


@dataclass
class LeftoverRay:
    """A local Ray whose fastlesion driver is gone but some of whose processes still run."""

    marker: Path
    driver_pid: int
    session_dir: str | None
    started: str
    processes: list[Any] = field(default_factory=list)  # psutil.Process

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self.processes)


def _ray_package_dir() -> str | None:
    try:
        import ray

        return str(Path(ray.__file__).resolve().parent)
    except Exception:  # noqa: BLE001
        return None


def _is_ray_process(p: Any, ray_dir: str | None) -> bool:
    """A process of Ray: a worker or agent (``ray::...``), a Ray binary, or Python running a file of Ray's package
    (a shell or a ``tail -f`` of the session's logs is none)."""
    try:
        cmd = p.cmdline()
        name = p.name()
    except Exception:  # noqa: BLE001
        return False
    if cmd and cmd[0].startswith("ray::") or name in ("raylet", "gcs_server"):
        return True
    return bool(ray_dir) and any(str(a).startswith(ray_dir) for a in cmd)


def _session_processes(session_dir: str, skip: set[int]) -> list[Any]:
    """Ray processes holding a file of ``session_dir`` open (trial workers and agents started after the marker)."""
    psutil = _psutil()

    prefix = session_dir.rstrip("/") + "/"
    ray_dir = _ray_package_dir()
    found = []
    for p in psutil.process_iter():
        if p.pid in skip or p.pid == os.getpid():
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(f.path.startswith(prefix) for f in p.open_files()) and _is_ray_process(p, ray_dir):
                found.append(p)
        except psutil.Error:
            continue
    return found


def find_leftover_rays(directory: str | Path | None = None) -> list[LeftoverRay]:
    """Local Rays of earlier fastlesion searches on this machine whose driver died but whose processes still run.

    A marker whose driver still runs (another search) is left alone; one of another machine (a cache on a shared
    home) too. A marker with nothing left running, unreadable, or from before the last boot is deleted.
    """
    psutil = _psutil()
    if psutil is None:
        return []
    folder = Path(directory or local_ray_dir())
    if not folder.is_dir():
        return []
    host, boot = socket.gethostname(), psutil.boot_time()
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            m = json.loads(path.read_text())
            if m["host"] != host:
                continue
            driver = m["driver"]
            stale = abs(float(m["boot_time"]) - boot) > 2.0
            if not stale and _process(driver["pid"], driver["create_time"]) is not None:
                continue  # its search is still running
            procs = [] if stale else [q for q in (_process(r["pid"], r["create_time"]) for r in m["processes"]) if q]
            if not stale and m.get("session_dir"):
                procs += _session_processes(m["session_dir"], {q.pid for q in procs})
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.debug("%s: unreadable local Ray marker (%s): removed", path, e)
            path.unlink(missing_ok=True)
            continue
        if procs:
            found.append(LeftoverRay(path, int(driver["pid"]), m.get("session_dir"), str(m.get("started", "?")),
                                     procs))
        else:
            path.unlink(missing_ok=True)
    return found


def stop_leftover_rays(directory: str | Path | None = None, timeout: float = 5.0) -> list[LeftoverRay]:
    """Stop the processes :func:`find_leftover_rays` finds (SIGTERM, SIGKILL after ``timeout`` s) and say so in one
    line each; where that is not allowed, one line with the ``kill`` command instead. Returns what was found."""
    psutil = _psutil()
    leftovers = find_leftover_rays(directory)
    for lo in leftovers:
        for p in lo.processes:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(lo.processes, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=3.0)
        what = (f"the local Ray of an earlier fastlesion search (driver pid {lo.driver_pid}, started {lo.started}, "
                f"no longer running; session {lo.session_dir or '?'})")
        if alive:
            pids = " ".join(str(p.pid) for p in sorted(alive, key=lambda p: p.pid))
            log.warning("%s left %d process(es) running that could not be stopped: stop them with `kill -9 %s` "
                        "(`ray stop` would stop every Ray on this machine, yours too)", what, len(alive), pids)
        else:
            log.warning("stopped %d leftover process(es) of %s: %s", len(lo.processes), what,
                        " ".join(map(str, lo.pids)))
            lo.marker.unlink(missing_ok=True)
    return leftovers


def init_ray(address: str | None) -> tuple[Any, bool]:
    """Connect to ``address`` (``auto``, ``ray://host:10001``) or start a local Ray sized to this machine.

    Returns ``(ray, started)``: ``started`` when this call started Ray (the caller shuts it down). A local start
    first stops what an earlier, killed fastlesion search left running (:func:`stop_leftover_rays`), then records
    the new Ray (:func:`write_local_ray_marker`).
    """
    ray, _ = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            try:
                stop_leftover_rays()
            except Exception as e:  # noqa: BLE001 - a clean-up must never stop a search
                log.debug("looking for leftover local Rays failed: %s", e)
            res = local_resources()
            ray.init(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False,
                     logging_level=logging.WARNING)
            write_local_ray_marker(ray)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastlesionError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {first}") from e
    return ray, True


@contextmanager
def ray_session(settings: TuneSettings, address: str | None) -> Iterator[tuple[dict[str, float], float, float]]:
    """Ray for one search, and what each trial gets on it: yields ``(total resources, gpus, cpus per trial)``.

    The resources are checked against the cluster Ray reports (a remote one may differ from this machine). Ray is
    shut down on the way out only when this started it: a cluster, or a Ray the caller started, stays up.
    """
    ray, started = init_ray(address)
    try:
        total, largest = cluster_resources(ray)
        g, c = resolve_resources(settings, total, largest,
                                 where=f"the Ray cluster at {address}" if address else "the local Ray")
        yield total, g, c
    finally:
        if started:
            ray.shutdown()
            if not address:
                remove_local_ray_marker()
