"""Resident anonymous memory (RssAnon: the heap and tensors, without mapped files such as the caches) of a
process, now and at its peak, for the benchmarks that report memory."""

from __future__ import annotations

import threading
import time


def rss_anon_mib(pid: int | str = "self") -> float:
    """RssAnon of process `pid` in MiB; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return 0.0
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


class PeakRssAnon:
    """The largest RssAnon of process `pid` seen every `interval` seconds while the `with` block runs: /proc
    keeps no peak of RssAnon (VmHWM also counts mapped files), so it is sampled."""

    def __init__(self, pid: int | str = "self", interval: float = 0.01):
        self.pid, self.interval, self.mib = pid, interval, 0.0
        self.running = False

    def __enter__(self) -> PeakRssAnon:
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.mib = max(self.mib, rss_anon_mib(self.pid))
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.mib = max(self.mib, rss_anon_mib(self.pid))
