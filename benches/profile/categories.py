# Sort perf-script samples (dwarf call graphs) of the agent into cost categories and tasks.
# usage: python3 benches/profile/categories.py FILE.script
import re,collections,sys
samples=open(sys.argv[1]).read().split('\n\n')
tot=0; cls=collections.Counter(); own=collections.Counter()
def classify(frames):
    leaf=frames[0]
    txt=' '.join(frames[:12])
    if 'memcpy' in leaf or 'memmove' in leaf: return 'memcpy/memmove'
    if '_copy_from_iter' in leaf or '_copy_to_iter' in leaf: return 'kernel socket copy'
    if any(k in txt for k in ('page_fault','clear_page','unmap_page','do_anonymous','__handle_mm','mmap','munmap','madvise')): return 'page faults/mmap'
    if any(k in leaf for k in ('malloc','free','realloc','_int_','tcache')): return 'malloc/free'
    if 'telespool::wire' in leaf: return 'wire walk'
    if any(k in txt for k in ('futex','schedule','finish_task_switch','park','unpark','epoll','try_to_wake_up','__x64_sys_sched')): return 'park/unpark/epoll/sched'
    if any(k in txt for k in ('tcp_','ip_','net_rx','__dev_queue','loopback','skb','sock_','softirq','__local_bh')): return 'kernel tcp'
    if 'h2::' in leaf or 'hpack' in leaf: return 'h2 framing'
    if 'hyper' in leaf: return 'hyper'
    if 'tokio::' in leaf: return 'tokio runtime'
    if '[k]' in leaf or 'kernel' in leaf: return 'kernel other'
    return 'other user'
for s in samples:
    lines=[l.strip() for l in s.strip().split('\n') if l.strip()]
    if len(lines)<2: continue
    tot+=1
    frames=[re.sub(r'^[0-9a-f]+ ','',l) for l in lines[1:]]
    c=classify(frames); cls[c]+=1
    if c in ('memcpy/memmove','page faults/mmap','malloc/free'):
        key='?'
        for f in frames[1:]:
            if 'telespool::' in f or 'copy_to_bytes' in f or 'h2::codec' in f or 'BytesMut::reserve' in f:
                key=f.split('+')[0][:100];break
        own[(c,key)]+=1
print('samples',tot)
for k,v in cls.most_common(): print('%5.1f%%  %s'%(100*v/tot,k))
print('-- owners of copies / faults / malloc')
for k,v in own.most_common(14): print('%5.1f%%  %s'%(100*v/tot,k))
print('-- by task (the future a sample runs under)')
k2=collections.Counter()
for s in samples:
    lines=[l.strip() for l in s.strip().split('\n') if l.strip()]
    if len(lines)<2: continue
    frames=[re.sub(r'^[0-9a-f]+ ','',l) for l in lines[1:]]
    txt=' '.join(frames)
    if 'h2::client' in txt or 'hyper::proto::h2::client' in txt or 'hyper_util::client' in txt: a='upstream HTTP/2 connection (sending batches, incl. kernel)'
    elif 'Pipeline::deliver' in txt or 'run_export_worker' in txt: a='export worker (building the request)'
    elif 'Receiver::accept' in txt: a='receiver accept (walk, budget, batcher)'
    elif 'receiver::grpc' in txt: a='receiver gRPC handler (body, reply)'
    elif 'hyper::proto::h2::server' in txt or 'h2::server' in txt or 'connections::connection' in txt: a='receiver HTTP/2 connections (incl. kernel)'
    elif 'park' in txt: a='runtime park/unpark'
    else: a='other'
    k2[a]+=1
for k,v in k2.most_common(): print('%5.1f%%  %s'%(100*v/tot,k))
