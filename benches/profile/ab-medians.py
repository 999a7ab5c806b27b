# Medians of a stat-agents.sh A/B (issue 17 round 3): per scenario and compression, NEW and OLD task-clock.
# usage: python3 benches/profile/ab-medians.py OUT.summary compression-grpc[,compression-http]
# (OUT.summary = stat-agents.sh's stdout; assumes --compression none,gzip,zstd and the bench's order:
#  all rounds of the first scenario, then the next; each round NEW's three compressions, then OLD's)
import sys,re,statistics
f,scen=sys.argv[1],sys.argv[2].split(',')
rows=[l.split() for l in open(f) if 'msec=' in l]
def get(r,k):
    for x in r:
        if x.startswith(k+'='): return float(x.split('=')[1].replace(',',''))
comps=['none','gzip','zstd']
rounds=len(rows)//(6*len(scen))
i=0
for s in scen:
    d={}
    for r in range(rounds):
        for who in ('new','before'):
            for c in comps:
                row=rows[i]; i+=1
                d.setdefault((who,c),[]).append((get(row,'msec'),get(row,'page-faults'),row[1]))
    for c in comps:
        n=[x[0] for x in d[('new',c)]]; b=[x[0] for x in d[('before',c)]]
        # page faults only when PERF_STAT counted them
        pf=lambda who: statistics.median(x[1] for x in d[(who,c)]) if all(x[1] is not None for x in d[(who,c)]) else float('nan')
        pn,pb=pf('new'),pf('before')
        print(f"{s} {c}: new {d[('new',c)][0][2]} {n} median {statistics.median(n):.0f} | before {d[('before',c)][0][2]} {b} median {statistics.median(b):.0f} | ratio {statistics.median(n)/statistics.median(b):.2f} | page faults median {pn:.0f} vs {pb:.0f}")
