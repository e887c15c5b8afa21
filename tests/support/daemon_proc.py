"""Start a real nexedge-daemon process for benchmarks and the fuzz test; read its RSS, threads, fds."""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

import yaml


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon (bytes), threads and open fds of a process (Linux /proc)."""
    out = {"rss": 0, "hwm": 0, "anon": 0, "threads": 0, "fds": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "VmRSS":
                    out["rss"] = int(v.split()[0]) * 1024
                elif k == "VmHWM":
                    out["hwm"] = int(v.split()[0]) * 1024
                elif k == "RssAnon":  # RSS without file-backed pages (shared libraries the OS may drop)
                    out["anon"] = int(v.split()[0]) * 1024
                elif k == "Threads":
                    out["threads"] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


class DaemonProc:
    """``nexedge-daemon`` as a subprocess with a YAML config; frames/metrics endpoints from its log."""

    def __init__(self, raw_config: Dict[str, Any], env: Optional[Dict[str, str]] = None,
                 python: str = sys.executable, nice: int = 0) -> None:
        self.dir = tempfile.mkdtemp(prefix="nexedge-daemon-")
        self.config = os.path.join(self.dir, "line.yaml")
        raw = json.loads(json.dumps(raw_config))
        raw.setdefault("logging", {}).update({"format": "json", "level": "INFO"})  # the ready line is INFO
        with open(self.config, "w") as f:
            yaml.safe_dump(raw, f)
        self.log_path = os.path.join(self.dir, "daemon.log")
        self._log = open(self.log_path, "wb")
        cmd = [python, "-m", "nexedge.serve.daemon", "--config", self.config]
        if nice:
            cmd = ["nice", "-n", str(nice)] + cmd
        # cwd: `python -m` puts the working directory first on sys.path, which would shadow the PYTHONPATH
        # a side-by-side run (--code-roots) picks the checkout with
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        self.frames = self.verdicts = ""
        self.metrics_port = 0

    def wait_ready(self, timeout: float = 60.0) -> "DaemonProc":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            for line in self.log().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "ready":
                    self.frames = rec["endpoints"]["frames"]
                    self.verdicts = rec["endpoints"]["verdicts"]
                    self.metrics_port = int(rec.get("metrics_port") or 0)
                    return self
            time.sleep(0.1)
        text = self.log()[-3000:]
        self.stop(timeout=10)  # never leave a daemon behind
        raise RuntimeError(f"daemon not ready within {timeout} s:\n{text}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_records(self) -> List[Dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def status(self) -> Dict[str, int]:
        return proc_status(self.proc.pid)

    def http(self, path: str, timeout: float = 5.0) -> int:
        """HTTP status of GET ``path`` on the metrics port (0 when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=timeout) as r:
                r.read()
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def metrics_text(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as r:
            return r.read().decode("utf-8")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)
