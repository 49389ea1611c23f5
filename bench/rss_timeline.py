"""Resident memory of one command over time, with its stderr lines time-stamped (to find which phase peaks).

    .venv/bin/python bench/rss_timeline.py .venv/bin/python -m sizewise.cli compress MODEL --budget 3.5bpw ... > log

Prints "MEM <s> <GB>" every 2 s, "ERR <s> <line>" for each stderr line, and "PEAK <GB> at <s>" at the end.
psutil samples the RSS; nothing here is a sizewise estimate."""

import subprocess, sys, time, psutil, threading
cmd = sys.argv[1:]
t0 = time.time()
p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
proc = psutil.Process(p.pid)
peak = [0, 0.0]
def sample():
    while p.poll() is None:
        try:
            r = proc.memory_info().rss
        except psutil.Error:
            break
        if r > peak[0]:
            peak[:] = [r, time.time() - t0]
        print(f"MEM {time.time()-t0:.0f} {r/1e9:.2f}", flush=True)
        time.sleep(2)
threading.Thread(target=sample, daemon=True).start()
buf = ""
while True:
    ch = p.stderr.read(1)
    if not ch:
        break
    if ch in "\r\n":
        if buf.strip():
            print(f"ERR {time.time()-t0:.0f} {buf.strip()[:200]}", flush=True)
        buf = ""
    else:
        buf += ch
p.wait()
print(f"PEAK {peak[0]/1e9:.2f} GB at {peak[1]:.0f} s; exit {p.returncode}", flush=True)
