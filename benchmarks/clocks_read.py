import sys, datetime
phases = [l.split() for l in open(sys.argv[1]) if len(l.split()) >= 3 and l.split()[0] in ("cublas","op","store","store+16mul","store+4sqrt","idle")]
rows = []
for l in open(sys.argv[2]):
    p = [v.strip() for v in l.split(",")]
    try: t = datetime.datetime.strptime(p[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError: continue
    rows.append((t, p[1:]))
for ph in phases:
    a, b = float(ph[1]) + 0.5, float(ph[2]) - 0.2
    sel = [r for t, r in rows if a <= t <= b]
    if not sel: print(ph[0], "no samples"); continue
    clk = sum(float(r[0]) for r in sel) / len(sel); pw = sum(float(r[1]) for r in sel) / len(sel)
    print(f"{ph[0]:<12} {' '.join(ph[3:]):>12} clock {clk:6.0f} MHz power {pw:6.1f} W (limit {sel[0][2]}) temp {sel[-1][3]} pcap {sum(r[4]=='Active' for r in sel)}/{len(sel)} hw {sum(r[5]=='Active' for r in sel)}/{len(sel)}")
