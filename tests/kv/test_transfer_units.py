"""Transfer building blocks without processes: page spans, block merging, shm writes between two pools."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from busserve.kv.storage import KVLayout, KVStorage, page_spans
from busserve.kv.transfer.base import TransferError, block_copies, spans_to
from busserve.kv.transfer.shm import ShmTransport
from busserve.messages import KVAddress

LAYOUT = KVLayout(num_layers=3, num_pages=32, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def _addr(pages: list[int], start: int, end: int, handle: str = "", expires_at: float = 0.0) -> KVAddress:
    return KVAddress(engine_id="R", request_id="r", transport="shm", start=start, end=end, pages=pages,
                     page_size=4, num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", handle=handle,
                     pool_pages=32, expires_at=expires_at)


def test_page_spans_cut_at_page_boundaries() -> None:
    assert list(page_spans(2, 11, 4)) == [(2, 2, 4), (4, 0, 4), (8, 0, 3)]
    assert list(page_spans(5, 5, 4)) == []


def test_block_copies_merge_consecutive_whole_pages() -> None:
    addr = _addr([10, 11, 12, 20], start=0, end=15)
    spans = spans_to(addr, [0, 1, 2, 3], 1, 15)
    assert block_copies(spans, 4) == [(0, 10, 1, 1, 4), (1, 11, 2, 0, 4), (3, 20, 1, 0, 3)]


def test_spans_refuse_positions_outside_the_reservation() -> None:
    with pytest.raises(TransferError):
        list(spans_to(_addr([1, 2], start=4, end=12), [0, 1, 2], 0, 12))


@pytest.mark.parametrize(("begin", "end"), [(0, 13), (4, 16), (5, 6)])
def test_shm_writer_lands_exactly_the_range(begin: int, end: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = KVStorage(LAYOUT, shm_name=f"busserve-kv-S-{begin}{end}")
    dst = KVStorage(LAYOUT, shm_name=f"busserve-kv-R-{begin}{end}")
    try:
        src.data.copy_(torch.randn(LAYOUT.shape))
        before = dst.data.clone()
        src_pages = [7, 3, 9, 1]  # a scrambled page table
        dst_start = begin - begin % 4
        dst_pages = [20, 21, 5, 6][: -(-(end - dst_start) // 4)]
        addr = _addr(dst_pages, dst_start, end, handle=dst.shm_name or "")
        with ThreadPoolExecutor(1) as ex:
            writer = ShmTransport(src, ex).open_writer(addr, src)
            for layer in range(3):
                writer.write(layer, src_pages, begin, end)
            done = threading.Event()
            result: list[object] = []
            writer.finish(lambda err, n: (result.append((err, n)), done.set()))
            assert done.wait(10)
        assert result[0] == (None, 3 * 2 * (end - begin) * 2 * 8 * 4)
        for layer in range(3):
            for p in range(0, 16):
                sk = src.data[layer, :, src_pages[p // 4], p % 4]
                if begin <= p < end:
                    dk = dst.data[layer, :, dst_pages[(p - dst_start) // 4], p % 4]
                    assert torch.equal(dk, sk)
        # nothing outside the range changed
        written = torch.zeros(LAYOUT.shape, dtype=torch.bool)
        for p in range(begin, end):
            written[:, :, dst_pages[(p - dst_start) // 4], p % 4] = True
        assert torch.equal(dst.data[~written], before[~written])
    finally:
        src.close()
        dst.close()


def test_writer_refuses_after_the_write_window(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = KVStorage(LAYOUT, shm_name="busserve-kv-S-lease")
    dst = KVStorage(LAYOUT, shm_name="busserve-kv-R-lease")
    try:
        addr = _addr([1, 2], 0, 8, handle=dst.shm_name or "", expires_at=1.0)  # long past
        with ThreadPoolExecutor(1) as ex:
            writer = ShmTransport(src, ex).open_writer(addr, src)
            writer.write(0, [3, 4], 0, 8)
            done = threading.Event()
            result: list[object] = []
            writer.finish(lambda err, n: (result.append(err), done.set()))
            assert done.wait(10)
        assert isinstance(result[0], TransferError) and "write window" in str(result[0])
    finally:
        src.close()
        dst.close()


def test_shm_to_another_host_is_refused() -> None:
    src = KVStorage(LAYOUT, shm_name="busserve-kv-S-host")
    try:
        with ThreadPoolExecutor(1) as ex, pytest.raises(TransferError, match="not on this host"):
            ShmTransport(src, ex).open_writer(_addr([1], 0, 4, handle="busserve-kv-R-elsewhere"), src)
    finally:
        src.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("begin", "end"), [(0, 13), (5, 6), (6, 16)])
def test_staged_reads_and_writes_match_the_host_views(dtype: torch.dtype, begin: int, end: int) -> None:
    """A device pool's transfers stage positions through host memory (read_positions / write_positions with
    ``staged``); on a CPU pool both ways must give the same bytes and land them in the same slots."""
    layout = KVLayout(num_layers=2, num_pages=16, page_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    pools = {staged: KVStorage(layout) for staged in (False, True)}
    pages, start = [9, 2, 14, 5], 0
    dst_pages, dst_start = [3, 11, 7, 12], begin - begin % 4
    for staged, pool in pools.items():
        pool.data.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(5)).to(dtype))
        pool.staged = staged
    reads = {staged: pool.read_positions(1, pages, begin, end, start) for staged, pool in pools.items()}
    assert reads[False].shape == (2, end - begin, 2, 8) and (reads[False] == reads[True]).all()
    want = torch.stack([pools[False].layer_kv(1)[i][[pages[p // 4] * 4 + p % 4 for p in range(begin, end)]]
                        for i in (0, 1)])
    got = torch.from_numpy(reads[True])
    assert torch.equal(got.view(dtype) if dtype != torch.float32 else got, want)
    for staged, pool in pools.items():
        before = pool.data.clone()
        pool.write_positions(0, dst_pages, begin, end, reads[staged], start=dst_start)
        slots = [dst_pages[(p - dst_start) // 4] * 4 + p % 4 for p in range(begin, end)]
        k, v = pool.layer_kv(0)
        assert torch.equal(k[slots], want[0]) and torch.equal(v[slots], want[1])
        written = torch.zeros(layout.shape, dtype=torch.bool)
        for p in range(begin, end):
            written[0, :, dst_pages[(p - dst_start) // 4], p % 4] = True
        assert torch.equal(pool.data[~written], before[~written])


def test_cuda_ipc_handles_are_checked_field_by_field() -> None:
    """A handle comes from another process: it is parsed as plain JSON fields, each checked, never unpickled."""
    import base64
    import json

    from busserve.kv.transfer.cuda_ipc import HANDLE_VERSION, parse_handle

    good = {"v": HANDLE_VERSION, "device": 0, "size": LAYOUT.nbytes, "offset": 0, "ref_counter_offset": 0,
            "event_sync_required": True, "handle": base64.b64encode(b"h" * 64).decode(),
            "ref_counter_handle": base64.b64encode(b"/torch_1_2").decode(), "event_handle": "",
            "storage_offset": 0, "nbytes": LAYOUT.nbytes}
    parsed = parse_handle(json.dumps(good), LAYOUT)
    assert parsed["handle"] == b"h" * 64 and parsed["ref_counter_handle"] == b"/torch_1_2"
    for change, why in [({"v": 9}, "unknown version"), ({"device": -1}, "'device' must be a non-negative"),
                        ({"size": "big"}, "'size' must be"), ({"event_sync_required": 1}, "true or false"),
                        ({"handle": "not base64!"}, "'handle' is not base64"),
                        ({"nbytes": 4}, "the address's layout needs"),
                        ({"size": LAYOUT.nbytes - 4}, "smaller than the pool")]:
        with pytest.raises(TransferError, match=why):
            parse_handle(json.dumps({**good, **change}), LAYOUT)
    with pytest.raises(TransferError, match="not JSON"):
        parse_handle("\x80pickle", LAYOUT)


def test_cuda_ipc_is_for_cuda_pools() -> None:
    from busserve.kv.transfer.cuda_ipc import CudaIpcTransport

    with pytest.raises(ValueError, match="between CUDA pools"):
        CudaIpcTransport(KVStorage(LAYOUT), ThreadPoolExecutor(1), None, None)  # type: ignore[arg-type]
