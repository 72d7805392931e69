"""The demo behind `make demo`: patch a small fleet on the local test bed with config/lab.toml.

The bed is the one PATCHD_LAB_DIR names (default /tmp/patchd-lab): the demo writes its
config to PATCHD_LAB_DIR/demo.toml from config/lab.toml and the bed's lab.env (its engine
socket, its state directory and control socket, a free metrics port), so a demo never
touches another bed or the machine's /run/patchd/control.sock. It stops at the first run
that fails, with the run's reason, and says when production waits for its soak.

1. builds a web image v1, pushes it to the lab registry as patchd-demo/web:stable;
2. starts 2 staging and 4 production containers from it;
3. publishes v2 under the same tag;
4. shows `patchd plan`, then starts `patchd daemon` and waits while it patches staging,
   soaks, and promotes to production exactly the digest staging verified;
5. shows the containers, `patchd history` and the daemon's metrics, and stops the daemon.

Expects the test bed to be up (`tests/lab/lab.sh up`; `make demo` does it).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from patchd import versions  # noqa: E402
from tests.lab import bed  # noqa: E402  (the test bed's lab.env, read as the tests read it)

TEMPLATE = ROOT / "config" / "lab.toml"
DEFAULT_LAB_DIR = "/tmp/patchd-lab"  # what config/lab.toml is written for
PATCHD = [sys.executable, "-m", "patchd.cli"]
LABEL = "patchd.demo"
WAIT = 180  # seconds for staging, its soak and production


def lab_dir() -> Path:
    return bed.lab_dir("PATCHD_LAB_DIR", default=DEFAULT_LAB_DIR)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def demo_config(env: dict[str, str], port: int) -> Path:
    """config/lab.toml for this bed: its engine, its state directory, this metrics port."""
    text = TEMPLATE.read_text()
    text = text.replace(f"unix://{DEFAULT_LAB_DIR}/run/d.sock", env["PATCHD_LAB_DOCKER_HOST"])
    text = text.replace(DEFAULT_LAB_DIR, str(lab_dir()))
    text = text.replace('"127.0.0.1:9863"', f'"127.0.0.1:{port}"')
    path = lab_dir() / "demo.toml"
    path.write_text(text)
    return path


PORT = free_port()
CONFIG = lab_dir() / "demo.toml"
METRICS = f"http://127.0.0.1:{PORT}/metrics"


def lab_env() -> dict[str, str]:
    return bed.read_env(lab_dir() / "lab.env")


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def build(client: Any, base: str, tag: str, version: str) -> str:
    dockerfile = f"""
FROM {base}
RUN mkdir -p /www && echo "patchd demo web {version}" > /www/index.html
LABEL org.opencontainers.image.version="{version}"
HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD test -f /www/index.html
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    for line in client.images.push(tag, stream=True, decode=True):
        if "error" in line:
            raise SystemExit(f"push failed: {line['error']}")
    digest: str = client.images.get_registry_data(tag).id
    return digest


def follow(daemon: subprocess.Popen[str], log_path: Path) -> threading.Thread:
    """Copy the daemon's JSON log to a file; print one short line per target and run."""

    def pump() -> None:
        assert daemon.stdout is not None
        with log_path.open("w") as log:
            for line in daemon.stdout:
                log.write(line)
                log.flush()
                try:
                    event = json.loads(line)
                except ValueError:
                    print(line, end="")
                    continue
                kind = event.get("event")
                if kind == "target_done":
                    change = ""
                    if event.get("version_to"):
                        change = f" {event['version_from']} -> {event['version_to']}"
                    print(
                        f"  {event['group']}: {event['target']} {event['result']}{change}"
                        f" ({event['seconds']}s)",
                        flush=True,
                    )
                elif kind == "run_finished":
                    print(
                        f"  {event['group']}: run {event['status']}, {event['succeeded']}"
                        f" patched, {event['failed']} failed",
                        flush=True,
                    )
                elif kind in ("started", "stopping", "stopped", "run_refused"):
                    detail = f": {event['reason']}" if "reason" in event else ""
                    print(f"  daemon {kind}{detail}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def patchd(*args: str) -> None:
    print(f"$ patchd {' '.join(args)}", flush=True)
    subprocess.run([*PATCHD, *args], check=False)


def last_run(group: str) -> dict[str, Any] | None:
    out = subprocess.run(
        [*PATCHD, "history", "-c", str(CONFIG), "--group", group, "--limit", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    runs: list[dict[str, Any]] = json.loads(out)
    return runs[0] if runs else None


def failure(run: dict[str, Any]) -> str | None:
    """Why a finished run failed, in its own words; None if it did not."""
    if run["status"] == "completed" and not run["failed"]:
        return None
    errors = [f"{t['target']}: {t['error']}" for t in run["targets"] if t["error"]]
    reasons = [run["error"], *errors] if run["error"] else errors
    return f"run {run['id']} of {run['group']} {run['status']}: " + (
        "; ".join(reasons) or "no reason recorded"
    )


def wait_for_production(daemon: subprocess.Popen[str]) -> None:
    """Until production has run; stop at the first failed run with its reason, and say
    when production waits for staging's soak."""
    deadline = time.monotonic() + WAIT
    soak_shown = False
    while time.monotonic() < deadline:
        for group in ("demo-staging", "demo-production"):
            run = last_run(group)
            if run is not None and run["finished"] and failure(run):
                raise SystemExit(f"demo FAILED: {failure(run)}")
        staging, production = last_run("demo-staging"), last_run("demo-production")
        if production is not None and production["finished"]:
            return
        if staging is not None and staging["finished"] and production is None and not soak_shown:
            print(
                f"  staging verified at {staging['finished']}; production waits for its"
                " soak (groups.demo-production.soak) before it starts",
                flush=True,
            )
            soak_shown = True
        if daemon.poll() is not None:
            raise SystemExit(f"patchd daemon exited with {daemon.returncode}")
        time.sleep(1)
    raise SystemExit(f"demo FAILED: production was not patched within {WAIT} s")


def main() -> int:
    env = lab_env()
    demo_config(env, PORT)
    print(f"config: {CONFIG} (config/lab.toml for the bed in {lab_dir()})")
    client = docker.DockerClient(base_url=env["PATCHD_LAB_DOCKER_HOST"])
    tag = f"{env['PATCHD_LAB_REGISTRY']}/patchd-demo/web:stable"

    say("clearing the previous demo")
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        container.remove(force=True)
    state = lab_dir() / "state"
    for path in state.glob("patchd.db*"):
        path.unlink()

    say(f"building v1 and pushing {tag}")
    v1 = build(client, env["PATCHD_LAB_BASE_IMAGE"], tag, "v1")
    print(f"v1 = {v1}")
    for tier, count in (("staging", 2), ("production", 4)):
        for i in range(1, count + 1):
            client.containers.run(
                tag,
                name=f"demo-{tier}-{i}",
                detach=True,
                init=True,
                network_mode="none",
                labels={LABEL: "web", "tier": tier},
                environment={"TIER": tier},
                restart_policy={"Name": "unless-stopped"},
            )
    print("started demo-staging-1..2 and demo-production-1..4 on v1")

    say("publishing v2 under the same tag")
    v2 = build(client, env["PATCHD_LAB_BASE_IMAGE"], tag, "v2")
    print(f"v2 = {v2}")

    say("what patchd would do (plan changes nothing)")
    patchd("check-config", "-c", str(CONFIG))
    patchd("plan", "-c", str(CONFIG))

    say("starting patchd daemon; the lab window is open, so it patches at once")
    log_path = lab_dir() / "demo-daemon.log"
    print(f"(full JSON log: {log_path})")
    daemon = subprocess.Popen(
        [*PATCHD, "daemon", "-c", str(CONFIG)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = follow(daemon, log_path)
    try:
        wait_for_production(daemon)

        say("containers now")
        for container in sorted(
            client.containers.list(filters={"label": LABEL}), key=lambda c: c.name
        ):
            digest = container.image.attrs.get("RepoDigests", ["?"])[0]
            health = container.attrs["State"].get("Health", {}).get("Status", "-")
            print(f"{container.name:22} {digest}  {container.status} ({health})")

        say("history")
        patchd("history", "-c", str(CONFIG))

        say("metrics (selected)")
        text = urllib.request.urlopen(METRICS, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(
                (
                    "patchd_patch_operations_total",
                    "patchd_runs_total",
                    "patchd_window_open",
                    "patchd_backend_up",
                    "patchd_config_last_reload_successful",
                )
            ):
                print(line)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        reader.join(timeout=5)
    production = last_run("demo-production")
    ok = production is not None and production["status"] == "completed" and not production["failed"]
    verified = production is not None and all(t["to"] == v2 for t in production["targets"])
    say(f"demo {'OK' if ok and verified else 'FAILED'}: production runs {versions.name(tag, v2)}")
    return 0 if ok and verified else 1


if __name__ == "__main__":
    sys.exit(main())
