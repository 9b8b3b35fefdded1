"""CUDA-event timing for the torch baselines: median of `repeat` timed calls after `warmup`."""
import torch


def time_ms(fn, warmup, repeat):
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for r in range(warmup + repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if r >= warmup:
            times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]
