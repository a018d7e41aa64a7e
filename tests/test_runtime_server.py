"""Runtime as a long-running service uses it: frames in any memory layout, inputs and argument
values a request may carry, a Runtime inherited by a forked worker process, signal handlers that
close it or raise during a call, and a Runtime dropped without close()."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from gfnet_edge.errors import InputError
from gfnet_edge.runtime import Runtime


@pytest.fixture(scope="module")
def demo_frames(demo_onnx_bundle):
    """uint8 frames of the demo task's test split at the model's input size (S x S: the
    model's crop_pct is 1, so the runtime takes them without a resize)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    model = demo_onnx_bundle.model
    frames, _ = ClutteredDigits("test", config=demo_config(model)).arrays(6, progress=False)
    assert frames.shape[1:] == (model.image_size, model.image_size, 3)
    return frames


def _same(a, b) -> None:
    for f in ("classes", "exit_step", "coords", "confidence"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("layout", ["fortran", "transposed"])
@pytest.mark.parametrize("cropped", [False, True])
def test_frames_in_any_memory_layout_give_the_answers_of_their_contiguous_copies(demo_onnx_bundle, demo_frames,
                                                                                 layout, cropped):
    """An S x S frame that is not C-contiguous (Fortran order, or a transposed view as a
    rotated camera image is) is classified like its C-contiguous copy, alone or in a list."""
    frames = [np.asfortranarray(f) if layout == "fortran" else np.ascontiguousarray(f.transpose(1, 0, 2)).transpose(1, 0, 2)
              for f in demo_frames]
    assert not any(f.flags.c_contiguous for f in frames)
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        want = rt.predict(demo_frames, cropped=cropped)
        _same(rt.predict(frames, cropped=cropped), want)
        one = rt.predict(frames[2], cropped=cropped)
        assert one.classes[0] == want.classes[2] and one.exit_step[0] == want.exit_step[2]
        np.testing.assert_array_equal(rt.trace(frames, cropped=cropped).probs,
                                      rt.trace(demo_frames, cropped=cropped).probs)


HUGE = 10 ** 400  # an int beyond the float range (float(HUGE) raises OverflowError)


@pytest.mark.parametrize("call, match", [
    (lambda rt, x: rt.predict(x, deadline_ms=HUGE), "deadline_ms must be a finite number"),
    (lambda rt, x: rt.predict(x, deadline_ms=-HUGE), "deadline_ms must be a finite number"),
    (lambda rt, x: rt.predict(x, deadline_ms=5.0, deadline_margin=HUGE), "deadline_margin must be a finite number"),
    (lambda rt, x: rt.predict_iter(x, deadline_ms=HUGE), "deadline_ms must be a finite number"),
    (lambda rt, x: rt.set_step_costs([HUGE, 1.0, 1.0]), "must be a finite number, got one beyond the float range"),
    (lambda rt, x: setattr(rt, "thresholds", [HUGE, 0.5, 0.5]), "thresholds must be 3 finite numbers"),
])
def test_integers_beyond_the_float_range_are_input_errors(demo_onnx_bundle, demo_frames, call, match):
    """Deadlines, margins, step costs and thresholds given as ints too large for a float are
    refused as InputError (not OverflowError), and the runtime goes on as before."""
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        rt.set_step_costs([0.5, 0.5, 0.5])
        want = rt.predict(demo_frames)
        with pytest.raises(InputError, match=match):
            call(rt, demo_frames)
        _same(rt.predict(demo_frames), want)


def _in_forked_child(body, seconds: float = 30.0) -> str:
    """Runs ``body()`` in a forked child and returns what it returned (a string), or says how the
    child ended when it hung (killed after ``seconds``) or raised. The child leaves with
    ``os._exit``, which skips the interpreter's exit handlers."""
    import os
    import signal
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            out = str(body())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = f"raised {type(exc).__name__}: {exc}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return f"hung for {seconds} s"
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("threads", [None, 2])
def test_a_forked_child_gets_a_clear_error_and_can_drop_the_inherited_runtime(demo_onnx_bundle, demo_frames, threads):
    """A worker forked from a process holding an open Runtime (a pre-forking server that loaded
    it first): using the inherited Runtime is an InputError that says to open one after the
    fork -- also while a thread of the parent was inside a call at the fork, holding its lock --;
    closing it, closing it again and dropping it return at once (the parent's sessions are not
    torn down in the child); a Runtime opened in the child works; the parent is unaffected."""
    import gc
    import threading

    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=threads) as rt:
        want = rt.predict(demo_frames)

        def use_inherited():
            msgs = []
            for call in (lambda: rt.predict(demo_frames), lambda: rt.trace(demo_frames),
                         lambda: list(rt.predict_iter(demo_frames)), lambda: rt.set_budget(None)):
                with pytest.raises(InputError, match="opened in process .* open a Runtime in each process") as e:
                    call()
                msgs.append(str(e.value))
            return "refused" if len(set(msgs)) == 1 else f"messages differ: {msgs}"

        def drop_inherited():
            nonlocal rt
            from gfnet_edge.runtime import api

            rt.close()
            rt.close()
            if not any(r is rt for r in api._INHERITED):  # `with` holds it here; a worker's own code may not
                return "the inherited Runtime is not held: dropping its last reference would tear down the parent's"
            rt = None
            gc.collect()
            with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=threads) as own:
                got = own.predict(demo_frames)
            return "dropped" if np.array_equal(got.classes, want.classes) else "other classes"

        assert _in_forked_child(use_inherited) == "refused"
        assert _in_forked_child(drop_inherited) == "dropped"
        stop = threading.Event()
        calls = []

        def busy():
            while not stop.is_set():
                calls.append(rt.predict(demo_frames))

        t = threading.Thread(target=busy)
        t.start()
        try:
            while not calls:  # a call of the thread has finished: it is inside its next one (or about to be)
                stop.wait(0.001)
            assert _in_forked_child(use_inherited) == "refused"
        finally:
            stop.set()
            t.join()
        _same(rt.predict(demo_frames), want)
        assert all(np.array_equal(c.classes, want.classes) for c in calls)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_the_fork_rule_comes_before_what_the_arguments_lack(demo_onnx_bundle, demo_frames):
    """In a forked child, a call of the inherited Runtime says to open one after the fork before
    anything about its arguments or settings: a deadline without step costs, a bad deadline, a
    bad batch size or budget; setting step costs, thresholds or the budget is refused the same
    way. A closed Runtime likewise says it is closed first."""
    calls = {
        "deadline without step costs": lambda rt: rt.predict(demo_frames, deadline_ms=5.0),
        "bad deadline": lambda rt: rt.predict(demo_frames, deadline_ms="5"),
        "bad batch size": lambda rt: rt.predict_iter(demo_frames, batch_size=0),
        "unknown budget": lambda rt: rt.predict_iter(demo_frames, budget="no such budget"),
        "iter deadline without step costs": lambda rt: rt.predict_iter(demo_frames, deadline_ms=5.0),
        # settings (allowed in the parent, and run there last: the calls above find no step costs)
        "step costs": lambda rt: rt.set_step_costs([1.0, 1.0, 1.0]),
        "thresholds": lambda rt: setattr(rt, "thresholds", [0.5, 0.5, -1.0]),
        "budget": lambda rt: rt.set_budget(None),
    }

    def refused(rt, match):
        import re

        out = []
        for name, call in calls.items():
            try:
                call(rt)
                out.append(f"{name}: ran")
            except InputError as exc:
                if not re.search(match, str(exc)):
                    out.append(f"{name}: {exc}")
        return "refused" if not out else "; ".join(out)

    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        assert rt.step_costs is None  # the fixture's bundle is not calibrated
        parent = refused(rt, "opened in process")  # the parent: each call fails on its argument, each setting is taken
        assert "opened in process" not in parent and all(f"{name}: ran" in parent for name in
                                                         ("step costs", "thresholds", "budget"))
        assert parent.count(": ran") == 3
        assert _in_forked_child(lambda: refused(rt, "opened in process .* open a Runtime in each process")) == "refused"
    assert refused(rt, "this Runtime is closed") == "refused"


@pytest.mark.parametrize("handler_raises", [False, True])
def test_close_from_a_signal_handler_during_a_call_of_the_same_thread(demo_onnx_bundle, demo_frames, handler_raises):
    """A service's shutdown handler (SIGTERM, here SIGALRM) that closes the Runtime while the
    thread it interrupts is inside a call: close() returns at once instead of waiting for that
    call forever; the call finishes with the answers of an undisturbed one (or ends with the
    handler's exception), the Runtime is released as it ends, and later calls say it is closed.
    A call made from the handler is refused the same way instead of waiting for the lock."""
    import signal

    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")
    frames = np.concatenate([demo_frames] * 8)
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as ref:
        want = ref.predict(frames)
    rt = Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1)
    seen = []

    class Shutdown(Exception):
        pass

    def handler(*_):
        with pytest.raises(InputError, match="from inside a call of this Runtime on the same thread, or while"):
            rt.predict(demo_frames[:1])
        rt.close()
        seen.append(rt.runner.active)  # still running the call below
        if handler_raises:
            raise Shutdown

    old = signal.signal(signal.SIGALRM, handler)
    run = rt.runner.run

    def slow_run(graph, x):  # the alarm lands inside the call
        if not seen:
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            while not seen:
                pass
        return run(graph, x)

    rt.runner.run = slow_run
    try:
        if handler_raises:
            with pytest.raises(Shutdown):
                rt.predict(frames)
        else:
            _same(rt.predict(frames), want)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [True]
    assert not rt.runner.active  # released as the call ended
    with pytest.raises(InputError, match="this Runtime is closed"):
        rt.predict(demo_frames)
    rt.close()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_runtime_dropped_without_close_frees_its_gpu_memory_and_engines_at_once(demo_onnx_bundle_copy, tmp_path,
                                                                                  monkeypatch, cuda_graphs):
    """A Runtime on the (simulated) GPU that a service drops without close() (a model reload)
    frees its loop's GPU buffers and releases its engines when the last reference goes, without
    waiting for the cyclic garbage collector."""
    import gc
    import weakref

    from gfnet_edge import ops
    from test_tensorrt_backend import _simulated_jetson

    root, _, _, _ = _simulated_jetson(demo_onnx_bundle_copy, tmp_path, monkeypatch)
    live = weakref.WeakSet()

    class Tracked(ops.DeviceBuffer):  # the simulated device's buffer, counted while alive
        def __init__(self, nbytes):
            super().__init__(nbytes)
            live.add(self)

    monkeypatch.setattr(ops, "DeviceBuffer", Tracked)
    frames = np.random.default_rng(0).integers(0, 256, (3, 150, 200, 3), dtype=np.uint8)
    gc.collect()
    gc.disable()
    try:
        rt = Runtime(root, backend="tensorrt", precision="fp32", cuda_graphs=cuda_graphs)
        rt.predict(frames)
        assert (rt.driver.place.graphs is not None) == cuda_graphs and len(live) > 0
        runner = weakref.ref(rt.runner)
        del rt
        assert len(live) == 0, f"{len(live)} GPU buffers held after the Runtime was dropped"
        assert runner() is None or not runner().active
    finally:
        gc.enable()


@pytest.mark.parametrize("bad, named", [
    (b"\x89PNG\r\n\x1a\n", "bytes"), (bytearray(16), "bytearray"), ("frame.png", "str"), ({"frame": None}, "dict"),
    (memoryview(np.zeros((8, 8, 3), np.uint8)), "memoryview"), (memoryview(b"abc"), "memoryview"),
])
def test_inputs_that_are_not_frames_name_their_type(demo_onnx_bundle, bad, named):
    """What a service may pass by mistake -- an encoded image's bytes, a file name, a request's
    dict, a buffer -- is one InputError naming the type it got (not an error about the items
    found by iterating it, nor another exception type)."""
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        for call in (rt.predict, rt.trace, rt.predict_iter):  # predict_iter: at the call, before any batch
            with pytest.raises(InputError, match=rf"expected uint8 HWC RGB frames .*, got {named}\b"):
                call(bad)


@pytest.mark.parametrize("dtype, shape, hint", [
    (np.float64, (2, 3, 224, 224), "astype"), (np.float16, (2, 3, 224, 224), "astype"),
    (np.uint8, (2, 3, 224, 224), "channels last"), (np.int64, (2, 224, 224, 3), ""),
    (np.uint8, (2, 224, 224, 4), "a grey or RGBA frame: convert it to RGB first"),
])
def test_a_stack_of_the_wrong_dtype_or_layout_is_described_as_a_whole(demo_onnx_bundle, dtype, shape, hint):
    """An (N, ...) array that is neither uint8 (N, H, W, 3) frames nor float32 (N, 3, S, S)
    images (float64 from a NumPy pipeline, channels-first uint8, RGBA) is refused naming its
    dtype and whole shape, not as a fault of its first image."""
    assert demo_onnx_bundle.model.image_size == 224
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        with pytest.raises(InputError) as e:
            rt.predict(np.zeros(shape, dtype))
    msg = str(e.value)
    assert f"got a {np.dtype(dtype)} array {shape}" in msg and "image 0" not in msg and hint in msg, msg


@pytest.mark.parametrize("shape", [(60, 80), (60, 80, 1), (60, 80, 4)])
def test_a_grey_or_rgba_frame_is_refused_saying_to_convert_it(demo_onnx_bundle, shape):
    """A grey or RGBA image read with PIL and np.asarray (what a folder of mixed images gives) is
    refused by every entry point with the conversion that makes it an RGB frame."""
    frame = np.zeros(shape, np.uint8)
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        for call in (lambda: rt.predict(frame), lambda: rt.predict([frame]), lambda: rt.trace([frame]),
                     lambda: next(iter(rt.predict_iter([frame])))):
            with pytest.raises(InputError, match=rf"got uint8 \({shape[0]}, {shape[1]}.*\) \(a grey or RGBA frame: "
                                                 r"convert it to RGB first, e\.g\. PIL's Image\.convert\('RGB'\)\)$"):
                call()


# an exception raised at a generator's entry as it is closed is printed, not raised: the test's own
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_exception_raised_by_a_signal_handler_anywhere_in_a_call_leaves_the_runtime_usable(demo_onnx_bundle,
                                                                                               demo_frames):
    """A signal handler that raises (KeyboardInterrupt on Ctrl-C, a service's SIGTERM handler
    raising SystemExit) runs at a Python function's entry: raised there at each function entry
    of a predict call in turn, the call ends with it, the Runtime's lock is left free and the
    next call gives the undisturbed answers (it never waits for a lock nobody holds)."""
    import sys
    import threading

    class Interrupt(BaseException):
        pass

    x = demo_frames[:2]
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        want = rt.predict(x)
        entries = [0]

        def count(frame, event, arg):
            if event == "call":
                entries[0] += 1

        sys.settrace(count)
        try:
            rt.predict(x)
        finally:
            sys.settrace(None)
        assert entries[0] > 20
        stuck = []
        for k in range(entries[0]):
            seen = [0]

            def interrupt(frame, event, arg):
                if event == "call":
                    seen[0] += 1
                    if seen[0] == k + 1:
                        sys.settrace(None)
                        raise Interrupt
                return None

            sys.settrace(interrupt)
            try:
                rt.predict(x)
            except Interrupt:
                pass
            finally:
                sys.settrace(None)
            out = []
            t = threading.Thread(target=lambda: out.append(rt.predict(x)), daemon=True)
            t.start()
            t.join(10)
            if not out:
                stuck.append(k)
                break
            _same(out[0], want)
        assert not stuck, f"the Runtime's lock stayed held after an exception at function entry {stuck[0]} of a call"


def test_the_call_lock_is_left_free_when_a_waiter_is_interrupted_as_it_leaves_the_queue():
    """A signal handler's exception as a waiting thread leaves the queue (before it takes the
    lock) must not leave its place at the head of the queue: the next thread takes the lock."""
    import collections
    import threading
    import time

    from gfnet_edge.runtime.api import FifoLock

    class InterruptedOnce(collections.deque):
        def popleft(self):
            if not getattr(self, "done", False):
                self.done = True
                raise KeyboardInterrupt
            return super().popleft()

    lock = FifoLock()
    lock.acquire()  # held here: the next taker waits in the queue
    lock._waiting = InterruptedOnce()
    said = []

    def waiter():
        try:
            lock.acquire()
        except KeyboardInterrupt:
            said.append("interrupted")

    first = threading.Thread(target=waiter)
    first.start()
    deadline = time.monotonic() + 10
    while not lock._waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(lock._waiting) == 1
    lock.owner = None
    lock.wake()
    first.join(10)
    assert said == ["interrupted"] and lock.owner is None and not lock._waiting
    second = threading.Thread(target=lock.acquire)
    second.start()
    second.join(10)
    assert not second.is_alive() and lock.owner == second.ident


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (a hang is killed there)")
def test_a_signal_handler_on_a_thread_waiting_for_the_lock_neither_waits_for_itself(demo_onnx_bundle, demo_frames):
    """The main thread waits for the call lock (another thread's call holds it) when a shutdown
    signal handler runs on it: a call from the handler is an InputError, close() from it returns
    at once, and the waiting call then runs, finds the Runtime closed, and releases it."""
    import signal
    import threading

    def scenario():
        rt = Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1)
        held, release, said = threading.Event(), threading.Event(), []

        def other_call():  # holds the lock as another thread's call does
            rt._lock.acquire()
            held.set()
            release.wait(20)
            rt._lock.owner = None
            rt._lock.wake()

        def handler(signum, frame):
            try:
                rt.predict(demo_frames)
                said.append("the handler's call ran")
            except InputError as exc:
                said.append("refused" if "while that thread waits" in str(exc) else str(exc))
            rt.close()
            said.append("closed")
            release.set()

        worker = threading.Thread(target=other_call)
        worker.start()
        held.wait(20)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # the main thread is queued for the lock by then
        try:
            rt.predict(demo_frames)
            said.append("the waiting call ran on a closed Runtime")
        except InputError as exc:
            said.append("then closed" if "is closed" in str(exc) else str(exc))
        worker.join(20)
        lock = rt._lock
        return ", ".join(said) + (", released" if rt._released and lock.owner is None and not lock._waiting else "")

    assert _in_forked_child(scenario) == "refused, closed, then closed, released"


def test_close_returns_once_released_and_a_release_cut_short_is_done_again(demo_onnx_bundle):
    """close() in a second thread while the first thread's close() is releasing returns only when
    everything is released; a release an exception cut short (Ctrl-C in the middle of it) is done
    by the next close()."""
    import threading

    rt = Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1)
    driver_close, inside, go_on = rt.driver.close, threading.Event(), threading.Event()

    def slow_close():
        inside.set()
        go_on.wait(20)
        driver_close()

    rt.driver.close = slow_close
    first = threading.Thread(target=rt.close)
    first.start()
    inside.wait(20)
    second = threading.Thread(target=rt.close)
    second.start()
    deadline = __import__("time").monotonic() + 20
    while second.ident not in tuple(rt._lock._waiting) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.001)
    assert second.is_alive() and rt.runner.active  # waits while the first is releasing
    go_on.set()
    second.join(20)
    assert not second.is_alive() and not rt.runner.active and rt._released
    first.join(20)

    rt = Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1)
    calls = []

    def interrupted_close():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    rt.driver.close = interrupted_close
    with pytest.raises(KeyboardInterrupt):
        rt.close()
    assert rt.runner.active and not rt._released
    rt.close()
    assert len(calls) == 2 and not rt.runner.active and rt._released


def test_the_lock_queue_is_guarded_by_a_mutex_no_exception_can_leave_unheld_in_a_wait():
    """A waiter leaves Condition.wait holding the queue's mutex whatever a signal handler raises
    in it: the mutex is an RLock, whose re-acquisition at the end of the wait is one C call with
    no Python function entry where an exception could skip it (with a Lock it is a Python method,
    and an exception at its entry left the waiter without the mutex: 'release unlocked lock')."""
    import types

    from gfnet_edge.runtime.api import FifoLock

    cond = FifoLock()._cond
    assert isinstance(cond._acquire_restore, types.BuiltinMethodType)
    assert isinstance(cond._release_save, types.BuiltinMethodType)
