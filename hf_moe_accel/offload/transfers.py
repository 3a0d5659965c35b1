"""Ordering of copies and compute on the "GPU side" device.

On CUDA, expert copies run on their own stream, so they overlap the compute stream and the CPU's
expert work; events order them (a kernel waits for the copies it reads, a copy into a slot waits
for the kernels still reading it). On the CPU, which stands in for the GPU in tests, every
operation runs in program order, so the same calls are plain copies and the events are None.
"""

from __future__ import annotations

import torch


class DeviceLanes:
    """A copy lane beside the current compute stream of `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None

    def copy_after(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], wait_for: torch.cuda.Event | None = None
    ) -> torch.cuda.Event | None:
        """Copy each (destination, source) on the copy lane, after `wait_for`; returns the event of completion."""
        if not self.is_cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        with torch.cuda.stream(self.copy_stream):
            if wait_for is not None:
                self.copy_stream.wait_event(wait_for)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def compute_wait(self, event: torch.cuda.Event | None) -> None:
        """Make later work on the compute stream wait for `event` (a copy)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def compute_mark(self) -> torch.cuda.Event | None:
        """An event at the current point of the compute stream."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def to_host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of device tensors, brought over in one transfer (one sync instead of one each)."""
        if not self.is_cuda:
            return list(tensors)
        pieces = []
        for t in tensors:
            raw = t.contiguous().view(-1).view(torch.uint8)
            pieces.append(raw)
            if raw.numel() % 8:  # 8-byte aligned, so every piece views back as its dtype
                pieces.append(raw.new_zeros(-raw.numel() % 8))
        packed = torch.cat(pieces).cpu()
        out, offset = [], 0
        for t in tensors:
            size = t.numel() * t.element_size()
            out.append(packed[offset : offset + size].view(t.dtype).view(t.shape))
            offset += size + (-size % 8)
        return out

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (host) on the device, copied from pinned memory without blocking the host."""
        if not self.is_cuda:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
