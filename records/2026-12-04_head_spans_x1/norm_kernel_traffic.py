"""Bytes moved by each inductor kernel of a compiled graph that loads or stores whole (65536, 768) activations,
and the bandwidth that implies at the time a call the profile gives it.

The graph's output code is the .py file that inductor writes into its cache (TORCHINDUCTOR_CACHE_DIR) and that
holds every kernel's source; the profile is a run's .profile.tsv. A load or store counts as whole when its index
walks 768 columns of every row; its bytes follow the pointer's dtype in the kernel's signature. Atomic adds (the
embeddings' backward) are not counted.

Usage: python3 norm_kernel_traffic.py OUTPUT_CODE.py RUN.profile.tsv"""
import re
import sys

TOKENS, DIM = 65536, 768
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def main(code_path: str, tsv_path: str):
    times = {}
    for line in open(tsv_path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4 and parts[1] == "0.0" and parts[3].startswith("triton_"):
            times[parts[3]] = (float(parts[0]), float(parts[2]))  # device us a step, calls a step
    code = open(code_path).read()
    for m in re.finditer(r"^(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''", code, re.S | re.M):
        name, body = m.group(1), m.group(2)
        dtypes = dict(re.findall(r"'(\w+)': '\*(\w+)'", body.split("inductor_meta")[0]))
        loads = stores = moved = 0
        for op, pointer, index in re.findall(r"tl\.(load|store)\((\w+) \+ \(([^)]*)\)", body):
            if re.search(rf"r0_\d+ \+ {DIM}\*x", index):
                moved += TOKENS * DIM * BYTES[dtypes[pointer]]
                loads, stores = loads + (op == "load"), stores + (op == "store")
        if name in times and moved:
            total_us, calls = times[name]
            us = total_us / calls
            print(f"{name}\n    whole loads {loads:2d}, stores {stores:2d}: {moved / 1e6:5.0f} MB in {us:6.1f} us "
                  f"a call = {moved / us / 1e6:4.2f} TB/s; {calls:3.0f} calls, {total_us / 1e3:5.2f} ms a step")


if __name__ == "__main__":
    main(*sys.argv[1:3])
