//! The port's completion-port semantics, one test per behaviour.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peer_common::uring_check;
use ringport::{
    Backend, CancelOutcome, Completion, Handle, Op, OpId, OpKind, Packet, Port, WaitError, Worker,
};

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// A connected pair: (our end, the peer's end).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (a, b)
}

fn one_worker<K: Send + Sync + 'static, D: Send + 'static>(
    b: Backend,
) -> (Port<K, D>, Worker<K, D>) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .build::<K, D>()
        .unwrap();
    assert_eq!(port.backend(), expected_name(b));
    assert_eq!(port.backend_kind(), b, "asked for {b}");
    (port, workers.pop().unwrap())
}

/// Whether the running kernel is at least `major.minor` (its release string).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

fn next<K: Send + Sync + 'static, D: Send + 'static>(w: &mut Worker<K, D>) -> Completion<K, D> {
    w.dequeue(WAIT).expect("a completion within 10 s")
}

fn expected_name(b: Backend) -> &'static str {
    match b {
        Backend::Epoll => "epoll",
        _ => "io_uring",
    }
}

/// `Auto` resolves to one of the two when the port is built, and both names agree.
#[test]
fn auto_resolves_to_a_named_backend() {
    let (port, _workers) = Port::builder()
        .workers(1)
        .backend(Backend::Auto)
        .build::<(), ()>()
        .unwrap();
    let kind = port.backend_kind();
    assert_ne!(kind, Backend::Auto);
    assert_eq!(port.backend(), expected_name(kind));
}

/// A receive pool no backend can have is refused as such, on every backend: not reported as
/// io_uring being unavailable, and not a reason for `Auto` to try epoll.
#[test]
fn an_impossible_receive_pool_is_refused_whatever_the_backend() {
    for backend in [Backend::Uring, Backend::Epoll, Backend::Auto] {
        for (size, count) in [(4096, 0), (4096, 40_000), (1 << 31, 1)] {
            let err = Port::builder()
                .workers(1)
                .backend(backend)
                .recv_pool(size, count)
                .build::<(), ()>()
                .err()
                .unwrap_or_else(|| panic!("{backend:?}: a pool of {count} x {size} was built"));
            let msg = err.to_string();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{msg}");
            assert!(msg.contains("receive pool"), "{backend:?}: {msg}");
            assert!(!msg.contains("io_uring"), "{backend:?}: {msg}");
        }
    }
}

/// Why the io_uring tests cannot run here, if they cannot: the kernel refuses io_uring (built
/// without it, the sysctl `kernel.io_uring_disabled`, a container's seccomp profile). Always
/// `None` with `RINGPORT_TEST_URING=require` (CI), where such a machine then fails the tests
/// instead of skipping them.
fn uring_refused() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        if !uring_check::refusal_skips() {
            return None;
        }
        match Port::builder()
            .workers(1)
            .backend(Backend::Uring)
            .recv_pool(4096, 1)
            .build::<(), ()>()
        {
            // Only the kernel's own refusal (`EPERM`, `EACCES`, `ENOSYS` from setting a ring
            // up) skips: anything else, a failing probe of the port's included, fails.
            Err(e) if uring_check::names_refusal(&e.to_string()) => Some(e.to_string()),
            _ => None,
        }
    })
    .clone()
}

/// Runs each listed test once per backend: `uring::name` and `epoll::name`. The io_uring ones
/// are skipped, saying so, where the kernel refuses io_uring (see `uring_refused`).
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() {
                if let Some(why) = super::uring_refused() {
                    println!("SKIPPED uring::{}: {why}", stringify!($name));
                    return;
                }
                super::$name(ringport::Backend::Uring)
            })*
        }
        mod epoll {
            $(#[test] fn $name() { super::$name(ringport::Backend::Epoll) })*
        }
    };
}

per_backend!(
    a_gathering_send_past_1024_buffers_goes_whole,
    shutdown_ends_armed_multishot_operations_on_every_worker,
    shutdown_keeps_a_part_way_send_and_a_due_timeout,
    a_receive_keeps_its_socket_open_after_every_handle_is_dropped,
    a_receive_appends_to_its_buffer,
    a_send_posted_behind_a_connect_follows_it,
    a_connect_held_behind_a_failed_send_still_runs,
    a_pool_of_single_accepts_takes_one_connection_each,
    dropping_a_port_leaves_the_dropping_thread_uninterrupted,
    recv_and_send_carry_key_data_and_buffer,
    peer_close_is_a_zero_byte_receive,
    timeout_is_not_a_failure,
    timeout_operation_expires_with_zero,
    a_zero_timeout_is_ready_for_the_next_poll,
    cancelling_a_timeout_that_is_due_finds_it_expired,
    a_cancelled_timeout_ends_as_it_stood_when_the_cancel_was_asked,
    a_timeout_runs_from_when_it_is_posted,
    batch_dequeue_returns_many,
    packets_posted_from_other_threads_wake_a_waiting_worker,
    posts_racing_the_shutdown_neither_hang_the_worker_nor_get_lost,
    operations_submitted_during_a_backlog_start_before_it_drains,
    input_waits_in_the_kernel_while_a_backlog_is_served,
    several_receives_outstanding_on_one_socket_fill_in_order,
    receives_waiting_for_data_fill_in_order,
    sends_waiting_for_room_go_out_in_order,
    operations_posted_through_the_port_keep_their_place,
    packets_posted_through_the_port_keep_their_place,
    a_receive_waiting_behind_another_can_be_cancelled,
    cancelling_a_socket_cancels_the_operations_waiting_on_it,
    work_posted_after_shutdown_is_cancelled,
    a_socket_of_another_port_is_refused,
    cancel_one_operation_and_all_of_a_socket,
    cancelling_another_workers_operation_is_forwarded,
    cancelling_a_finished_operation_leaves_later_ones_alone,
    close_cancels_outstanding_refuses_new_and_releases_the_socket,
    a_send_completes_when_all_of_it_has_gone,
    a_partial_send_completes_with_what_the_kernel_took,
    sends_posted_together_go_out_whole_and_in_order,
    a_send_cancelled_part_way_reports_what_went,
    a_gathering_send_goes_on_across_its_buffers,
    a_send_cancelled_before_its_part_is_seen_goes_no_further,
    a_send_cut_short_cancels_the_sends_held_behind_it,
    a_reset_reaches_the_waiting_receive,
    a_reset_reaches_a_send_waiting_beside_a_receive,
    sends_posted_before_a_gap_is_handed_out_are_cancelled,
    sends_posted_before_a_gap_is_handed_out_in_a_batch_are_cancelled,
    a_reset_seen_by_a_send_reaches_a_later_receive,
    a_send_cancelled_before_any_of_it_went_lets_the_next_go,
    cancels_from_any_thread_reach_the_home_worker,
    accept_and_connect,
    multishot_accept_takes_every_connection_until_cancelled,
    multishot_submitted_from_another_thread_completes_on_the_home_worker,
    connect_refused_is_named,
    a_socket_connected_again_after_a_refusal_ends_cleanly,
    connect_refused_completes_beside_a_receive,
    a_second_connect_during_a_handshake_is_already_under_way,
    multishot_accept_on_a_file_is_not_a_socket,
    operations_run_on_the_home_worker,
    shutdown_completes_in_flight_operations_then_reports_shutdown,
    dropping_a_worker_with_receives_in_flight_waits_for_the_kernel,
    dropping_a_worker_with_multishot_operations_armed_closes_what_it_accepted,
    receive_without_spare_capacity_is_refused,
    pooled_receive_completes_many_times_and_holds_no_buffer_while_idle,
    pooled_receive_ends_with_enobufs_when_the_pool_runs_dry,
    pooled_receive_without_a_buffer_ends_even_with_no_data,
    a_pool_buffer_held_on_to_is_parked_and_another_circulates,
    small_receives_share_a_pool_buffer,
    slices_of_a_shared_buffer_gather_and_return_from_another_thread,
    pooled_receive_on_a_datagram_socket_is_refused,
    gathering_send_sends_pool_buffers_in_order_and_gives_them_back,
    pooled_receive_rearmed_after_data_and_close_sees_both,
    pooled_receive_without_a_pool_is_refused,
    pooled_receive_posted_as_single_shot_is_refused,
    cancelling_a_pooled_receive_while_data_streams_loses_nothing,
    pooled_receive_with_a_limit_ends_there_and_the_rest_waits,
    limited_receives_sharing_pool_buffers_each_get_their_own_bytes,
    pooled_receive_reads_past_an_urgent_mark,
    pooled_receive_reads_past_a_message_with_descriptors,
    closing_a_socket_with_a_pooled_receive_armed_gives_every_buffer_back,
    wake_ups_are_not_lost_when_the_submission_queue_fills,
    a_worker_moves_to_another_thread_after_use,
    a_worker_outlives_the_thread_that_started_its_operations,
    sends_outlive_the_threads_that_post_them,
    cancelling_one_handle_of_a_duplicated_socket_on_one_thread,
    huge_timeouts_wait_instead_of_panicking,
    cancelling_on_the_home_worker_reaches_operations_still_in_its_queue,
    send_offset_past_the_end_is_refused,
    handle_addresses_and_shutdown,
    single_thread_workers_serve_from_their_own_thread,
    a_panic_while_a_worker_is_dropped_leaks_what_the_kernel_may_still_write,
    work_posted_to_a_dropped_worker_comes_back_whole,
    a_panicking_drop_while_a_worker_is_dropped_comes_after_the_kernel,
    work_sent_after_the_shutdown_answer_comes_back,
);

#[test]
fn types_cross_threads() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<Port<u64, Vec<u8>>>();
    sync::<Port<u64, Vec<u8>>>();
    send::<Worker<u64, Vec<u8>>>();
    send::<Handle<u64>>();
    sync::<Handle<u64>>();
    // What a post to a gone worker gives back can travel as any error does.
    fn boxed_error<E: std::error::Error + Send + Sync + 'static>() {}
    boxed_error::<ringport::Rejected<(Op<u64>, Vec<u8>)>>();
    boxed_error::<ringport::Rejected<Packet<u64, Vec<u8>>>>();
    send::<Completion<u64, Vec<u8>>>();
}

fn recv_and_send_carry_key_data_and_buffer(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u32>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, "conn-1").unwrap();

    peer.write_all(b"hello").unwrap();
    let id = w.submit(Op::recv(&h, Vec::with_capacity(64)), 7);
    let c = next(&mut w);
    assert_eq!(c.id, id);
    assert_eq!(c.kind, OpKind::Recv);
    assert_eq!(c.result.as_ref().unwrap(), &5);
    assert_eq!(c.key(), Some(&"conn-1"));
    assert_eq!(c.data, 7);
    assert_eq!(c.buf.as_deref(), Some(&b"hello"[..]));

    let c = {
        w.submit(Op::send(&h, b"xxworld".to_vec(), 2), 8);
        next(&mut w)
    };
    assert_eq!(c.kind, OpKind::Send);
    assert_eq!(c.result.unwrap(), 5);
    assert_eq!(c.data, 8);
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world");
}

fn peer_close_is_a_zero_byte_receive(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(16)), ());
    drop(peer);
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), 0);
    assert!(c.buf.unwrap().is_empty());
}

fn timeout_is_not_a_failure(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    // Nothing posted: polling and a short wait both time out.
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    // A failed operation is a completion carrying the errno.
    let (ours, peer) = pair();
    socket2::SockRef::from(&peer)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(peer); // RST
    let h = port.associate(ours, ()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    w.submit(Op::recv(&h, Vec::with_capacity(16)), ());
    let c = next(&mut w);
    let err = c.result.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");
    assert!(c.buf.is_some(), "the buffer comes back on error too");
}

fn timeout_operation_expires_with_zero(b: Backend) {
    let (_port, mut w) = one_worker::<(), u8>(b);
    w.submit(Op::timeout(Duration::from_millis(5)), 3);
    let c = next(&mut w);
    assert_eq!(c.kind, OpKind::Timeout);
    assert_eq!(c.result.unwrap(), 0);
    assert_eq!(c.data, 3);
    assert!(c.handle.is_none());
}

/// A timeout of zero is due as it is posted: the next poll (a dequeue with a zero timeout)
/// takes it, on both backends. (On io_uring with deferred task work, as single-thread workers
/// have, the kernel's own timer would report it only at a later wait.)
fn a_zero_timeout_is_ready_for_the_next_poll(b: Backend) {
    let (_port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .single_thread_workers(true)
        .build::<(), u8>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    w.submit(Op::timeout(Duration::ZERO), 4);
    let c = w
        .dequeue(Some(Duration::ZERO))
        .expect("the zero timeout was not ready");
    assert_eq!(c.kind, OpKind::Timeout);
    assert_eq!(c.result.unwrap(), 0);
    assert_eq!(c.data, 4);
}

/// A timeout cancelled after it fell due has expired: `Ok(0)` on both backends (on io_uring the
/// kernel's timer has fired and the cancel finds nothing).
fn cancelling_a_timeout_that_is_due_finds_it_expired(b: Backend) {
    let (_port, mut w) = one_worker::<(), u8>(b);
    let posted = std::time::Instant::now();
    let id = w.submit(Op::timeout(Duration::from_millis(200)), 3);
    match w.dequeue(Some(Duration::ZERO)) {
        Err(WaitError::TimedOut) => {}
        // This thread was held up past the deadline already: nothing left to cancel.
        Ok(c) => {
            assert!(
                posted.elapsed() >= Duration::from_millis(200),
                "fired early"
            );
            return assert_eq!((c.id, c.result.unwrap()), (id, 0));
        }
        Err(e) => panic!("dequeue: {e}"),
    }
    std::thread::sleep(Duration::from_millis(300));
    w.cancel(id);
    let c = next(&mut w);
    assert_eq!((c.id, c.result.unwrap()), (id, 0));
}

/// A timeout cancelled when it was due has expired (`Ok(0)`), and one cancelled before it was
/// due is cancelled, however late the worker's next wait comes: what counts is when the cancel
/// was asked, on both backends (on io_uring the kernel takes both requests only at that wait).
fn a_cancelled_timeout_ends_as_it_stood_when_the_cancel_was_asked(b: Backend) {
    let (_port, mut w) = one_worker::<(), u8>(b);
    // Due before the cancel, both posted before the next wait.
    let due = w.submit(Op::timeout(Duration::from_millis(1)), 1);
    std::thread::sleep(Duration::from_millis(30));
    w.cancel(due);
    let c = next(&mut w);
    assert_eq!(
        (c.id, c.result.ok()),
        (due, Some(0)),
        "a timeout due at the cancel"
    );
    // Cancelled well before it is due; the wait that takes the cancel to the kernel comes after.
    // (Should this thread be held up 300 ms before the cancel, the timeout is due at it.)
    let posted = std::time::Instant::now();
    let early = w.submit(Op::timeout(Duration::from_millis(300)), 2);
    if let Ok(c) = w.dequeue(Some(Duration::ZERO)) {
        assert!(
            posted.elapsed() >= Duration::from_millis(300),
            "fired early"
        );
        return assert_eq!((c.id, c.result.ok()), (early, Some(0)));
    }
    w.cancel(early);
    let before = posted.elapsed() < Duration::from_millis(300);
    std::thread::sleep(Duration::from_millis(400));
    let c = next(&mut w);
    assert_eq!(c.id, early);
    if before {
        assert!(
            c.is_cancelled(),
            "a timeout cancelled before it was due: {c:?}"
        );
    }
}

/// A timeout runs from when it is posted, not from the worker's next wait: one posted first
/// and due first fires first, though another, shorter, was posted in the meantime.
fn a_timeout_runs_from_when_it_is_posted(b: Backend) {
    let (_port, mut w) = one_worker::<(), u8>(b);
    // Due at 40 ms; the second at 30 ms or later plus 20 ms.
    w.submit(Op::timeout(Duration::from_millis(40)), 1);
    std::thread::sleep(Duration::from_millis(30));
    w.submit(Op::timeout(Duration::from_millis(20)), 2);
    let first = next(&mut w);
    let second = next(&mut w);
    assert_eq!((first.data, second.data), (1, 2));
}

fn batch_dequeue_returns_many(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    for i in 0..32 {
        port.post(0, Packet::new(i)).unwrap();
    }
    let mut out = Vec::new();
    let n = w.dequeue_batch(&mut out, 64, WAIT).unwrap();
    assert_eq!(n, 32);
    let data: Vec<usize> = out.iter().map(|c| c.data).collect();
    assert_eq!(data, (0..32).collect::<Vec<_>>());
    // `max` bounds a batch.
    for i in 0..10 {
        w.post(0, Packet::new(i)).unwrap();
    }
    out.clear();
    assert_eq!(w.dequeue_batch(&mut out, 4, WAIT).unwrap(), 4);
}

/// A worker working through a long backlog of completions still hands the kernel what it
/// submits meanwhile: a send posted after the first of 1,000 queued packets reaches the peer
/// while most of them are still to be handed out (its completion then queues behind them).
fn operations_submitted_during_a_backlog_start_before_it_drains(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u64>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, "conn").unwrap();
    for i in 0..1000u64 {
        let packet = Packet {
            bytes: 0,
            handle: None,
            data: i,
        };
        port.post(0, packet).unwrap();
    }
    assert_eq!(next(&mut w).data, 0, "the backlog is queued");
    let id = w.submit(Op::send(&h, b"pong".to_vec(), 0), u64::MAX);
    for i in 1..300u64 {
        let c = next(&mut w);
        assert_eq!((c.kind, c.data), (OpKind::Packet, i));
    }
    // 700 packets are still queued; the send has gone out.
    let mut got = [0u8; 4];
    peer.read_exact(&mut got)
        .expect("the send reaches the peer while the backlog is handed out");
    assert_eq!(&got, b"pong");
    let mut packets = 0;
    let sent = loop {
        let c = next(&mut w);
        if c.id == id {
            break c;
        }
        packets += 1;
    };
    assert_eq!(sent.result.unwrap(), 4);
    assert_eq!(
        packets, 700,
        "completions keep their order behind the backlog"
    );
}

/// Input that arrives while a worker hands out a backlog brought by one reap stays in the
/// kernel until that backlog is served (read at once, it would wait in pool buffers behind
/// it); then it is taken, even though the worker keeps queueing work for itself meanwhile, and
/// comes behind that work.
/// (On io_uring with single-thread workers, whose deferred task work runs only when the worker
/// asks for completions; other io_uring rings take input as it comes.)
fn input_waits_in_the_kernel_while_a_backlog_is_served(b: Backend) {
    const SENDS: u64 = 400;
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .single_thread_workers(true)
        .recv_pool(4096, 16)
        .build::<u8, u64>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    if b == Backend::Uring && !w.single_thread() {
        println!("SKIPPED: this kernel's io_uring has no deferred task work (Linux 6.1)");
        return;
    }
    let (ours, mut peer) = pair();
    let (quiet, mut talker) = pair();
    // A socket's sends run one at a time: the backlog's come from as many handles, each with
    // its own descriptor of the one socket.
    let handles: Vec<_> = (0..SENDS)
        .map(|_| port.associate(ours.try_clone().unwrap(), 1).unwrap())
        .collect();
    drop(ours);
    let input = port.associate(quiet, 2).unwrap();
    let recv = w.submit_multishot(Op::recv_pooled(&input), u64::MAX);
    for (i, h) in (0..SENDS).zip(&handles) {
        w.submit(Op::send(h, vec![b'x'], 0), i);
    }
    // One reap brings every send's completion.
    assert_eq!(next(&mut w).data, 0, "the backlog is queued");
    talker.write_all(b"hello").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while input.readable_bytes().unwrap() < 5 {
        assert!(
            Instant::now() < deadline,
            "the input never reached the socket"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut handed = 1;
    let mut received = None;
    while handed < 4 * SENDS {
        if handed <= SENDS - 100 {
            assert_eq!(
                input.readable_bytes().unwrap(),
                5,
                "input taken from the kernel after {handed} of the backlog of {SENDS}"
            );
        }
        let c = next(&mut w);
        handed += 1;
        if c.id == recv {
            received = Some(c);
            break;
        }
        // A packet for itself behind each one handed out: the queue never gets shorter.
        let again = Packet {
            bytes: 0,
            handle: None,
            data: c.data,
        };
        w.post(0, again).unwrap();
    }
    let c = received.expect("the input is taken once the backlog is served");
    // Taken near the end of the backlog, it is handed out behind the packets queued meanwhile.
    assert!(
        (SENDS + SENDS / 2..3 * SENDS).contains(&handed),
        "handed out after {handed}"
    );
    assert_eq!(c.pooled.as_deref(), Some(&b"hello"[..]));
    let mut sent = vec![0u8; SENDS as usize];
    peer.read_exact(&mut sent).unwrap();
    assert!(sent.iter().all(|&x| x == b'x'));
}

/// Packets posted while the worker finishes its shutdown: the worker still reports the
/// shutdown (it never waits on a queue it was not woken for), and every packet the port
/// accepted is dequeued.
fn posts_racing_the_shutdown_neither_hang_the_worker_nor_get_lost(b: Backend) {
    for _ in 0..100 {
        let (port, mut w) = one_worker::<(), u32>(b);
        let poster = {
            let port = port.clone();
            std::thread::spawn(move || {
                let mut accepted = 0u32;
                while accepted < 20_000 && port.post(0, Packet::new(accepted)).is_ok() {
                    accepted += 1;
                }
                accepted
            })
        };
        port.shutdown();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut dequeued = 0u32;
            loop {
                match w.dequeue(None) {
                    Ok(c) => {
                        assert_eq!(c.kind, OpKind::Packet);
                        dequeued += 1;
                    }
                    Err(WaitError::Shutdown) => break,
                    Err(e) => panic!("dequeue: {e}"),
                }
            }
            let _ = tx.send(dequeued);
        });
        let dequeued = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the worker reported the shutdown");
        assert_eq!(dequeued, poster.join().unwrap());
    }
}

fn packets_posted_from_other_threads_wake_a_waiting_worker(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u64>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, "key").unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let port = port.clone();
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..250u64 {
                    let packet = Packet {
                        bytes: 42,
                        handle: Some(h.clone()),
                        data: t * 1000 + i,
                    };
                    port.post(0, packet).unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    while seen.len() < 1000 {
        let c = next(&mut w);
        assert_eq!(c.kind, OpKind::Packet);
        assert_eq!(*c.result.as_ref().unwrap(), 42);
        assert_eq!(c.key(), Some(&"key"));
        seen.push(c.data);
    }
    for t in threads {
        t.join().unwrap();
    }
    seen.sort_unstable();
    let want: Vec<u64> = (0..4u64)
        .flat_map(|t| (0..250).map(move |i| t * 1000 + i))
        .collect();
    assert_eq!(seen, want);
}

fn several_receives_outstanding_on_one_socket_fill_in_order(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let ids: Vec<_> = (0..3)
        .map(|i| w.submit(Op::recv(&h, Vec::with_capacity(4)), i))
        .collect();
    // Data arrives in one piece after all three are posted.
    peer.write_all(b"aaaabbbbcccc").unwrap();
    let mut got = vec![Vec::new(); 3];
    let mut total = 0;
    while total < 12 {
        let c = next(&mut w);
        let n = c.result.unwrap();
        assert!(n > 0);
        assert_eq!(
            c.id, ids[c.data],
            "a completion carries its own operation's id"
        );
        total += n;
        got[c.data] = c.buf.unwrap();
        if total < 12 && got.iter().all(|b| !b.is_empty()) {
            break;
        }
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    // Posted order is execution order: concatenating by posting order restores the stream.
    assert_eq!(got.concat(), b"aaaabbbbcccc");
}

/// What [`three_receives_waiting`] gives back.
type Waiting = (
    Port<(), usize>,
    Worker<(), usize>,
    Handle<()>,
    TcpStream,
    Vec<OpId>,
);

/// One worker with three 4-byte receives (data 0, 1, 2) posted on one socket and handed to the
/// kernel, where they find nothing to read: the port, the worker, the socket, its peer, and the
/// receives' ids.
fn three_receives_waiting(b: Backend) -> Waiting {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let ids = (0..3)
        .map(|i| w.submit(Op::recv(&h, Vec::with_capacity(4)), i))
        .collect();
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    (port, w, h, peer, ids)
}

/// Receives that reach the kernel before any data does (so each waits for readiness there)
/// still fill in the order they were posted.
fn receives_waiting_for_data_fill_in_order(b: Backend) {
    let (_port, mut w, _h, mut peer, _ids) = three_receives_waiting(b);
    peer.write_all(b"aaaabbbbcccc").unwrap();
    let mut got = vec![Vec::new(); 3];
    for _ in 0..3 {
        let c = next(&mut w);
        assert_eq!(c.result.unwrap(), 4);
        got[c.data] = c.buf.unwrap();
    }
    assert_eq!(got.concat(), b"aaaabbbbcccc");
}

/// Sends that wait for room in a full socket buffer go out in the order they were posted.
fn sends_waiting_for_room_go_out_in_order(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, peer) = pair();
    ours.set_nonblocking(true).unwrap();
    // Fill the socket's send buffer and the peer's receive buffer.
    let filled = fill_for_good(&ours, 0);
    let h = port.associate(ours, ()).unwrap();
    let parts: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 4096]).collect();
    for (i, p) in parts.iter().enumerate() {
        w.submit(Op::send(&h, p.clone(), 0), i);
    }
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    let reader = std::thread::spawn(move || {
        let mut peer = peer;
        let mut all = vec![0u8; filled + 3 * 4096];
        peer.read_exact(&mut all).unwrap();
        all.split_off(filled)
    });
    for _ in 0..3 {
        let c = next(&mut w);
        assert_eq!(c.result.unwrap(), 4096);
    }
    let got = reader.join().unwrap();
    let want = parts.concat();
    // Compared by position, not printed whole (12 KiB).
    let first_wrong = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        (got.len(), first_wrong),
        (want.len(), None),
        "the sends' bytes came out of order"
    );
}

/// An operation posted through the port, which waits in its worker's queue, still goes before
/// one that the same thread then posts through the worker itself: sends and receives alike.
fn operations_posted_through_the_port_keep_their_place(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    port.submit(Op::send(&h, b"aaaa".to_vec(), 0), 1).unwrap();
    w.submit(Op::send(&h, b"bbbb".to_vec(), 0), 2);
    port.submit(Op::recv(&h, Vec::with_capacity(4)), 3).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(4)), 4);
    for _ in 0..2 {
        assert_eq!(next(&mut w).result.unwrap(), 4);
    }
    let mut sent = [0u8; 8];
    peer.read_exact(&mut sent).unwrap();
    assert_eq!(&sent, b"aaaabbbb");
    peer.write_all(b"xxxx").unwrap();
    let c = next(&mut w);
    let (data, buf) = (c.data, c.buf.unwrap());
    assert_eq!(
        (data, &buf[..]),
        (3, &b"xxxx"[..]),
        "the first receive posted gets the bytes"
    );
    w.cancel_all(&h);
    let c = next(&mut w);
    assert_eq!(c.data, 4);
    assert!(c.is_cancelled(), "{:?}", c.result);
}

/// A packet posted through the port, which waits in the worker's queue, comes out before one
/// the same thread then posts through the worker itself.
fn packets_posted_through_the_port_keep_their_place(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    if port.post(0, Packet::new(1)).is_err() {
        panic!("the worker is alive");
    }
    if w.post(0, Packet::new(2)).is_err() {
        panic!("the worker is alive");
    }
    let order: Vec<usize> = (0..2).map(|_| next(&mut w).data).collect();
    assert_eq!(order, [1, 2]);
}

/// A receive posted behind another on the same socket can be cancelled before its turn; the
/// others keep their order.
fn a_receive_waiting_behind_another_can_be_cancelled(b: Backend) {
    let (_port, mut w, _h, mut peer, ids) = three_receives_waiting(b);
    assert_eq!(w.cancel(ids[1]), CancelOutcome::Requested);
    let c = next(&mut w);
    assert_eq!(c.id, ids[1]);
    assert!(c.is_cancelled(), "{:?}", c.result);
    assert_eq!(
        c.buf.map(|b| b.capacity() >= 4),
        Some(true),
        "its buffer comes back"
    );
    assert_eq!(w.in_flight(), 2);
    peer.write_all(b"aaaabbbb").unwrap();
    let mut got = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..2 {
        let c = next(&mut w);
        assert_eq!(c.result.unwrap(), 4);
        got[c.data] = c.buf.unwrap();
    }
    assert_eq!((&got[0][..], &got[2][..]), (&b"aaaa"[..], &b"bbbb"[..]));
}

/// `cancel_all` and a close also cancel the operations waiting their turn on the socket, and
/// leave the socket's sides free for what is posted next.
fn cancelling_a_socket_cancels_the_operations_waiting_on_it(b: Backend) {
    let (_port, mut w, h, mut peer, _ids) = three_receives_waiting(b);
    w.cancel_all(&h);
    let mut cancelled: Vec<usize> = (0..3)
        .map(|_| {
            let c = next(&mut w);
            assert!(c.is_cancelled(), "{:?}", c.result);
            c.data
        })
        .collect();
    cancelled.sort_unstable();
    assert_eq!(cancelled, [0, 1, 2]);
    assert_eq!(w.in_flight(), 0);
    // The receive side is free again.
    w.submit(Op::recv(&h, Vec::with_capacity(4)), 3);
    peer.write_all(b"next").unwrap();
    let c = next(&mut w);
    assert_eq!((c.data, c.buf.unwrap()), (3, b"next".to_vec()));
    // A close cancels what waits too.
    for i in 4..6 {
        w.submit(Op::recv(&h, Vec::with_capacity(4)), i);
    }
    w.submit(Op::close(&h), 6);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = next(&mut w);
        if c.data < 6 {
            assert!(c.is_cancelled(), "{:?}", c.result);
        }
        seen.push(c.data);
    }
    seen.sort_unstable();
    assert_eq!(seen, [4, 5, 6]);
}

/// Work posted once the port is shut down completes with `ECANCELED` and never reaches the
/// socket.
fn work_posted_after_shutdown_is_cancelled(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    port.shutdown();
    w.submit(Op::send(&h, b"late".to_vec(), 0), 1);
    let c = next(&mut w);
    assert_eq!(c.data, 1);
    assert!(c.is_cancelled(), "{:?}", c.result);
    assert_eq!(
        c.buf.as_deref(),
        Some(&b"late"[..]),
        "its buffer comes back"
    );
    assert!(matches!(w.dequeue(WAIT), Err(WaitError::Shutdown)));
    // Everything let go of, the socket closes: the peer reads to its end, and nothing before it.
    drop((h, c, w, port));
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).expect("a FIN");
    assert_eq!(rest, b"", "the send reached the socket");
}

/// An operation on a handle of another port fails with `InvalidInput` (its buffer comes back)
/// rather than run on a worker that is not its home; the port it belongs to is unaffected.
fn a_socket_of_another_port_is_refused(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (other, mut w2) = one_worker::<(), u8>(b);
    // Posted on `w2`, a receive on `h` fails at once with `InvalidInput`, its buffer back.
    let refused_on_w2 = |w2: &mut Worker<(), u8>, h: &Handle<()>, data: u8| {
        w2.submit(Op::recv(h, Vec::with_capacity(4)), data);
        let c = next(w2);
        assert_eq!(c.data, data);
        assert_eq!(
            c.result.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidInput)
        );
        assert!(c.buf.is_some(), "its buffer comes back");
    };
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(4)), 1);
    refused_on_w2(&mut w2, &h, 2);
    assert_eq!(w2.in_flight(), 0);
    let refused = other
        .submit(Op::recv(&h, Vec::with_capacity(4)), 3)
        .unwrap();
    let c = next(&mut w2);
    assert_eq!((c.id, c.result.is_err()), (refused, true));
    peer.write_all(b"mine").unwrap();
    let c = next(&mut w);
    assert_eq!((c.data, c.buf.unwrap()), (1, b"mine".to_vec()));
    // A socket of a port with more workers than this one, at an index this port lacks: the
    // same refusal.
    let (wide, _wide_workers) = Port::builder()
        .workers(2)
        .backend(b)
        .build::<(), u8>()
        .unwrap();
    let (theirs, _their_peer) = pair();
    let far = wide.associate_with(1, theirs, ()).unwrap();
    refused_on_w2(&mut w2, &far, 4);
}

/// Ids of finished operations stay dead: cancelling one, from this thread or another, leaves
/// alone the operation posted after it (whose record may take the same slot).
fn cancelling_a_finished_operation_leaves_later_ones_alone(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let first = w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    peer.write_all(b"x").unwrap();
    let c = next(&mut w);
    assert_eq!((c.id, c.data, c.result.unwrap()), (first, 1, 1));

    for round in 2..6u8 {
        let later = w.submit(Op::recv(&h, Vec::with_capacity(8)), round);
        assert_ne!(later, first);
        w.cancel(first);
        let port2 = port.clone();
        std::thread::spawn(move || port2.cancel(first))
            .join()
            .unwrap();
        assert!(matches!(
            w.dequeue(Some(Duration::from_millis(20))),
            Err(WaitError::TimedOut)
        ));
        peer.write_all(b"y").unwrap();
        let c = next(&mut w);
        assert_eq!(c.id, later);
        assert_eq!(c.data, round);
        assert_eq!(c.result.unwrap(), 1, "not cancelled");
    }
}

fn cancel_one_operation_and_all_of_a_socket(b: Backend) {
    let (port, mut w) = one_worker::<(), &'static str>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let id = w.submit(Op::recv(&h, Vec::with_capacity(8)), "one");
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    assert_eq!(w.cancel(id), CancelOutcome::Requested);
    let c = next(&mut w);
    assert_eq!(c.id, id);
    assert!(c.is_cancelled(), "{:?}", c.result);
    assert_eq!(c.buf.unwrap().capacity(), 8);
    // Done: nothing left to cancel (IOCP's ERROR_NOT_FOUND).
    assert_eq!(w.cancel(id), CancelOutcome::NotFound);

    w.submit(Op::recv(&h, Vec::with_capacity(8)), "a");
    w.submit(Op::recv(&h, Vec::with_capacity(8)), "b");
    let t = w.submit(Op::timeout(Duration::from_secs(60)), "timer");
    w.cancel_all(&h);
    let mut cancelled = [next(&mut w), next(&mut w)];
    cancelled.sort_by_key(|c| c.data);
    assert!(cancelled.iter().all(Completion::is_cancelled));
    assert_eq!(cancelled[0].data, "a");
    assert_eq!(cancelled[1].data, "b");
    // The timer was not on that socket and is still pending; cancel it from another thread.
    let port2 = port.clone();
    std::thread::spawn(move || port2.cancel(t)).join().unwrap();
    let c = next(&mut w);
    assert_eq!(c.data, "timer");
    assert!(c.is_cancelled());
}

/// Two workers, and a connected socket whose home is the second.
struct SecondOfTwo {
    port: Port<(), u8>,
    w0: Worker<(), u8>,
    w1: Worker<(), u8>,
    h: Handle<()>,
    /// The socket's peer, kept open.
    peer: TcpStream,
}

impl SecondOfTwo {
    fn new(b: Backend) -> Self {
        let (port, workers) = Port::builder()
            .workers(2)
            .backend(b)
            .build::<(), u8>()
            .unwrap();
        let [w0, w1]: [Worker<(), u8>; 2] = workers.try_into().unwrap();
        let (ours, peer) = pair();
        let h = port.associate_with(1, ours, ()).unwrap();
        SecondOfTwo {
            port,
            w0,
            w1,
            h,
            peer,
        }
    }
}

/// A worker cancelling an operation on another worker's socket sends the request there
/// (`Forwarded`); that worker's completion tells whether it was still in flight. A worker that
/// is gone has nothing in flight.
fn cancelling_another_workers_operation_is_forwarded(b: Backend) {
    let SecondOfTwo {
        port: _port,
        mut w0,
        mut w1,
        h,
        peer: _peer,
    } = SecondOfTwo::new(b);
    let id = w0.submit(Op::recv(&h, Vec::with_capacity(8)), 7);
    assert_eq!(w0.cancel(id), CancelOutcome::Forwarded);
    let c = w1.dequeue(WAIT).unwrap();
    assert_eq!((c.id, c.data), (id, 7));
    assert!(c.is_cancelled(), "{:?}", c.result);
    assert_eq!(w1.cancel(id), CancelOutcome::NotFound);
    drop(c);
    drop(w1);
    assert_eq!(w0.cancel(id), CancelOutcome::NotFound);
}

/// Cancels asked for from a thread that is no worker (`Port::cancel`, `Port::cancel_all`), and
/// a worker's `cancel_all` of another worker's socket, reach the socket's home worker: its
/// operations there complete as cancelled, one posted behind another included.
fn cancels_from_any_thread_reach_the_home_worker(b: Backend) {
    let SecondOfTwo {
        port,
        mut w0,
        mut w1,
        h,
        peer: _peer,
    } = SecondOfTwo::new(b);
    let cancelled = |w: &mut Worker<(), u8>, n: usize| {
        let mut got: Vec<u8> = (0..n)
            .map(|_| {
                let c = w.dequeue(WAIT).unwrap();
                assert!(c.is_cancelled(), "{}: {:?}", c.data, c.result);
                c.data
            })
            .collect();
        got.sort_unstable();
        got
    };

    // One operation, by its id, from another thread.
    let id = w1.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    std::thread::scope(|s| {
        s.spawn(|| port.cancel(id));
    });
    assert_eq!(cancelled(&mut w1, 1), [1]);

    // Every operation of the socket, from another thread: the one in the kernel and the one
    // held behind it.
    w1.submit(Op::recv(&h, Vec::with_capacity(8)), 2);
    w1.submit(Op::recv(&h, Vec::with_capacity(8)), 3);
    std::thread::scope(|s| {
        s.spawn(|| port.cancel_all(&h));
    });
    assert_eq!(cancelled(&mut w1, 2), [2, 3]);

    // Every operation of the socket, from the other worker.
    w1.submit(Op::recv(&h, Vec::with_capacity(8)), 4);
    w1.submit(Op::recv(&h, Vec::with_capacity(8)), 5);
    w0.cancel_all(&h);
    assert_eq!(cancelled(&mut w1, 2), [4, 5]);
    assert!(matches!(
        w0.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
}

fn close_cancels_outstanding_refuses_new_and_releases_the_socket(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    w.submit(Op::close(&h), 2);
    let mut got: Vec<_> = (0..2).map(|_| next(&mut w)).collect();
    got.sort_by_key(|c| c.data);
    assert!(got[0].is_cancelled());
    assert_eq!(got[1].kind, OpKind::Close);
    assert!(got[1].result.is_ok());
    assert!(h.is_closed());
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 3);
    let c = next(&mut w);
    assert_eq!(
        c.result.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    // A second close is posted after the first, too.
    w.submit(Op::close(&h), 4);
    let again = next(&mut w);
    assert_eq!(
        again.result.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    drop((got, c, again, h));
    // The last handle is gone and nothing is in flight: the peer sees EOF.
    let mut buf = [0u8; 8];
    assert_eq!(peer.read(&mut buf).unwrap(), 0);
}

/// `len` bytes that tell their offset and `seed`: a byte out of place shows.
fn numbered(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ ((i >> 8) as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Reads exactly `len` bytes from `peer` on a thread of its own.
fn read_on_thread(mut peer: TcpStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        peer.read_exact(&mut got)
            .expect("the peer reads what was sent");
        got
    })
}

/// Reads `peer` to EOF (every handle of our end dropped, nothing in flight) and asserts that
/// it got exactly `sent`: the count a completion reported, and those bytes.
fn assert_peer_got_exactly(mut peer: TcpStream, sent: &[u8]) {
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(
        got.len(),
        sent.len(),
        "the peer got another count than reported"
    );
    assert!(got == sent, "the peer got other bytes");
}

/// A send on a stream completes once all of its bytes have gone out, as a completion port's
/// does, though the kernel takes them in parts: 64 MiB to a peer that reads nothing yet stays
/// in flight; once the peer reads, it completes with the whole count, every byte in order.
fn a_send_completes_when_all_of_it_has_gone(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let data = numbered(64 << 20, 1);
    w.submit(Op::send(&h, data.clone(), 0), ());
    // The socket buffers take a part; the rest waits for the peer.
    match w.dequeue(Some(Duration::from_millis(200))) {
        Err(WaitError::TimedOut) => {}
        Ok(c) => panic!(
            "a 64 MiB send to a peer that reads nothing completed: {:?}",
            c.result
        ),
        Err(e) => panic!("dequeue: {e:?}"),
    }
    let reader = read_on_thread(peer, data.len());
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), data.len());
    assert_eq!(c.buf.unwrap().len(), data.len());
    assert!(reader.join().unwrap() == data, "the peer got other bytes");
}

/// A send marked `partial` completes with the part the kernel took at once, as `send(2)`
/// does: 64 MiB to a peer that reads nothing comes back short, its buffer whole.
fn a_partial_send_completes_with_what_the_kernel_took(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let data = numbered(64 << 20, 7);
    w.submit(Op::send(&h, data.clone(), 0).partial(), ());
    let c = next(&mut w);
    let n = *c.result.as_ref().unwrap();
    assert!(
        n > 0 && n < data.len(),
        "sent {n} of 64 MiB to a peer that reads nothing"
    );
    assert_eq!(c.buf.as_ref().unwrap().len(), data.len());
    drop((c, h));
    assert_peer_got_exactly(peer, &data[..n]);
}

/// Two sends posted together on one socket: the second goes out only after all of the first,
/// though the kernel takes the first in parts (the peer reads only once both are posted).
fn sends_posted_together_go_out_whole_and_in_order(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let first = numbered(16 << 20, 2);
    let second = numbered(1000, 3);
    w.submit(Op::send(&h, first.clone(), 0), 0);
    w.submit(Op::send(&h, second.clone(), 0), 1);
    // Let the first fill the socket buffers before anyone reads.
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(100))),
        Err(WaitError::TimedOut)
    ));
    let reader = read_on_thread(peer, first.len() + second.len());
    let mut counts = [None, None];
    for _ in 0..2 {
        let c = next(&mut w);
        counts[c.data] = Some(c.result.unwrap());
    }
    assert_eq!(counts, [Some(first.len()), Some(second.len())]);
    let got = reader.join().unwrap();
    let expected = [first, second].concat();
    let at = got.iter().zip(&expected).position(|(g, e)| g != e);
    assert_eq!(
        at, None,
        "the bytes differ from those sent, first at this offset"
    );
}

/// A send cancelled part-way completes with the count of the bytes that went out (not
/// `ECANCELED`, which would leave the caller not knowing which did), and the peer gets exactly
/// those.
fn a_send_cancelled_part_way_reports_what_went(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let data = numbered(64 << 20, 4);
    let id = w.submit(Op::send(&h, data.clone(), 0), ());
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    w.cancel(id);
    let c = next(&mut w);
    let n = *c.result.as_ref().expect("the count of what went");
    assert!(
        n > 0 && n < data.len(),
        "sent {n} of 64 MiB to a peer that reads nothing"
    );
    drop((c, h));
    assert_peer_got_exactly(peer, &data[..n]);
}

/// Shutdown with a send part-way out and a timeout already due: the send completes `Ok` with
/// the count that went (the peer gets exactly those bytes), the timeout `Ok(0)`.
fn shutdown_keeps_a_part_way_send_and_a_due_timeout(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let data = numbered(64 << 20, 5);
    w.submit(Op::send(&h, data.clone(), 0), 1);
    // The send goes part of the way (the peer reads nothing); then a timeout falls due.
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    w.submit(Op::timeout(Duration::from_millis(1)), 2);
    std::thread::sleep(Duration::from_millis(200));
    port.shutdown();
    let mut got = std::collections::HashMap::new();
    loop {
        match w.dequeue(WAIT) {
            Ok(c) => {
                assert!(got
                    .insert(c.data, c.result.map_err(|e| e.raw_os_error()))
                    .is_none());
            }
            Err(WaitError::Shutdown) => break,
            Err(e) => panic!("dequeue: {e}"),
        }
    }
    assert_eq!(got.get(&2), Some(&Ok(0)), "the timeout that was due");
    let n = match got.get(&1) {
        Some(Ok(n)) => *n,
        other => panic!("the send part-way out: {other:?}"),
    };
    assert!(
        n > 0 && n < data.len(),
        "sent {n} of 64 MiB to a peer that reads nothing"
    );
    drop((h, w, port));
    assert_peer_got_exactly(peer, &data[..n]);
}

/// Every handle of a socket dropped while a receive waits on it: the descriptor stays open
/// (its number is not given to another socket) until the receive completes, which it does
/// with the peer's bytes; then the socket closes.
fn a_receive_keeps_its_socket_open_after_every_handle_is_dropped(b: Backend) {
    use std::os::fd::AsRawFd;
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let fd = h.as_raw_fd();
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    drop(h);
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_ne!(
        other.as_raw_fd(),
        fd,
        "the number was given to another socket"
    );
    peer.write_all(b"hi").unwrap();
    let c = next(&mut w);
    assert_eq!(
        (c.data, c.result.as_ref().ok(), c.buf.as_deref()),
        (1, Some(&2), Some(&b"hi"[..]))
    );
    assert!(c.handle.is_some(), "the completion carries the handle");
    drop(c);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest)
        .expect("a FIN once the last handle went");
    assert!(rest.is_empty());
}

/// A receive appends what it reads to what its buffer already holds.
fn a_receive_appends_to_its_buffer(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let mut buf = Vec::with_capacity(16);
    buf.extend_from_slice(b"ab");
    w.submit(Op::recv(&h, buf), 1);
    peer.write_all(b"cd").unwrap();
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), 2);
    assert_eq!(c.buf.as_deref(), Some(&b"abcd"[..]));
}

/// A send posted right after a connect, before it completes, follows it (a connect counts as
/// one of the socket's sends): it goes out on the connection, not fails for want of one.
fn a_send_posted_behind_a_connect_follows_it(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u8>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, "listener").unwrap();
    w.submit(Op::accept(&l), 0);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let s = port.associate(sock, "client").unwrap();
    w.submit(Op::connect(&s, addr), 1);
    w.submit(Op::send(&s, b"ping".to_vec(), 0), 2);
    let mut accepted = None;
    let mut results = [None, None, None];
    for _ in 0..3 {
        let c = next(&mut w);
        results[usize::from(c.data)] = Some(c.result.map_err(|e| e.raw_os_error()));
        if let Some(a) = c.accepted {
            accepted = Some(a);
        }
    }
    assert_eq!(results[1], Some(Ok(0)), "the connect");
    assert_eq!(results[2], Some(Ok(4)), "the send behind it");
    let mut a = accepted.expect("the accept");
    let mut got = [0u8; 4];
    a.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

/// A connect posted behind a send that fails (on a socket not connected yet) is not taken for
/// one of the sends behind the gap: it runs, as one posted after the failure would.
fn a_connect_held_behind_a_failed_send_still_runs(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u8>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let s = port.associate(sock, "client").unwrap();
    w.submit(Op::send(&s, b"too soon".to_vec(), 0), 0);
    w.submit(Op::connect(&s, addr), 1);
    let mut results = [None, None];
    for _ in 0..2 {
        let c = next(&mut w);
        results[usize::from(c.data)] = Some(c.result.map_err(|e| e.raw_os_error()));
    }
    assert!(
        matches!(results[0], Some(Err(Some(e))) if e != libc::ECANCELED),
        "the send fails: {:?}",
        results[0]
    );
    assert_eq!(results[1], Some(Ok(0)), "the connect behind it");
    assert!(listener.accept().is_ok());
}

/// Several single accepts posted on one listener (a pool of pending accepts, as with
/// `AcceptEx`): each takes one connection, none twice, and none is left for a connection
/// beyond them.
fn a_pool_of_single_accepts_takes_one_connection_each(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, ()).unwrap();
    for i in 0..4 {
        w.submit(Op::accept(&l), i);
    }
    let clients: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut from = Vec::new();
    let mut which = Vec::new();
    for _ in 0..4 {
        let c = next(&mut w);
        assert_eq!(c.kind, OpKind::Accept);
        c.result.as_ref().unwrap();
        which.push(c.data);
        from.push(c.accepted.expect("a connection").peer_addr().unwrap());
    }
    which.sort_unstable();
    assert_eq!(which, [0, 1, 2, 3], "each accept completes once");
    let mut want: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    from.sort();
    want.sort();
    assert_eq!(from, want, "one connection each");
    let _fifth = TcpStream::connect(addr).unwrap();
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(50))),
        Err(WaitError::TimedOut)
    ));
}

/// Shutdown with multishot operations armed on two workers with receive pools (a pooled
/// receive whose peer keeps sending, a multishot accept): on each worker every one of them
/// ends exactly once, its last completion not `more`, before the worker says `Shutdown`, and
/// once the completions are dropped each pool has every buffer back.
fn shutdown_ends_armed_multishot_operations_on_every_worker(b: Backend) {
    let (port, workers) = Port::builder()
        .workers(2)
        .backend(b)
        .recv_pool(4096, 16)
        .build::<u8, u8>()
        .unwrap();
    let mut writers = Vec::new();
    let mut keep = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let (ours, peer) = pair();
        let h = port.associate_with(i, ours, 0).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let l = port.associate_with(i, listener, 1).unwrap();
        assert_eq!((h.worker(), l.worker()), (w.index(), w.index()));
        keep.push((h, l));
        writers.push(std::thread::spawn(move || {
            let mut peer = peer;
            peer.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            // Until the socket is full, or 4 MiB.
            for _ in 0..1024 {
                if peer.write_all(&[9u8; 4096]).is_err() {
                    break;
                }
            }
            peer
        }));
    }
    let mut workers = workers;
    // The completions, kept (with their pool buffers) until the end.
    let mut held = Vec::new();
    for (w, (h, l)) in workers.iter_mut().zip(&keep) {
        w.submit_multishot(Op::recv_pooled(h), 0);
        w.submit_multishot(Op::accept_multishot(l), 1);
        // Armed, and some input taken.
        let c = next(w);
        assert!(c.more && c.pooled.is_some(), "{:?}", c.result);
        held.push(c);
    }
    port.shutdown();
    for w in &mut workers {
        let mut ended = [0u32; 2];
        loop {
            match w.dequeue(WAIT) {
                Ok(c) => {
                    let data = usize::from(c.data);
                    assert_eq!(ended[data], 0, "operation {data} completed after its last");
                    if !c.more {
                        ended[data] += 1;
                    }
                    held.push(c);
                }
                Err(WaitError::Shutdown) => break,
                Err(e) => panic!("dequeue: {e}"),
            }
        }
        assert_eq!(
            ended,
            [1, 1],
            "worker {}: each armed operation ended once",
            w.index()
        );
        assert!(matches!(
            w.dequeue(Some(Duration::ZERO)),
            Err(WaitError::Shutdown)
        ));
    }
    drop(held);
    for w in &workers {
        assert_eq!(
            w.pool_available(),
            16,
            "worker {}: every buffer back",
            w.index()
        );
    }
    drop(keep);
    for wr in writers {
        wr.join().unwrap();
    }
}

/// A gathering send of more pool buffers than one `sendmsg` takes (the kernel's 1024) goes on
/// in further calls and completes whole: every byte, in order, and every buffer back.
fn a_gathering_send_past_1024_buffers_goes_whole(b: Backend) {
    const PIECES: usize = 1100;
    let (port, mut w) = pooled_worker(b, 16, 2048);
    let (ours, peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    let data = numbered(PIECES * 16, 6);
    w.submit_multishot(Op::recv_pooled(&h), 1);
    (&peer).write_all(&data).unwrap();
    let mut bufs = Vec::new();
    let mut got = 0;
    while got < data.len() {
        let c = next(&mut w);
        if let Some(buf) = c.pooled {
            got += buf.len();
            bufs.push(buf);
        } else {
            // The ring ran dry for a moment (it grows as receives find it empty).
            assert!(
                c.result
                    .as_ref()
                    .is_err_and(|e| e.raw_os_error() == Some(libc::ENOBUFS)),
                "{:?}",
                c.result
            );
        }
        if !c.more {
            w.submit_multishot(Op::recv_pooled(&h), 1);
        }
    }
    let n = bufs.len();
    assert!(n >= PIECES, "{n} slices of 16-byte buffers for {got} bytes");
    let reader = read_on_thread(peer, data.len());
    w.submit(Op::send_pooled_gather(&h, bufs, 0), 2);
    let c = next(&mut w);
    assert_eq!(
        (c.data, c.result.as_ref().ok(), c.gathered.len()),
        (2, Some(&data.len()), n)
    );
    assert!(reader.join().unwrap() == data, "the peer got other bytes");
}

fn accept_and_connect(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, ()>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, "listener").unwrap();
    w.submit(Op::accept(&l), ());
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let s = port.associate(sock, "client").unwrap();
    w.submit(Op::connect(&s, addr), ());
    let mut kinds = Vec::new();
    let mut accepted = None;
    for _ in 0..2 {
        let c = next(&mut w);
        c.result.as_ref().unwrap();
        kinds.push((c.kind, *c.key().unwrap()));
        if let Some(a) = c.accepted {
            accepted = Some(a);
        }
    }
    kinds.sort_by_key(|k| k.1);
    assert_eq!(
        kinds,
        vec![(OpKind::Connect, "client"), (OpKind::Accept, "listener")]
    );
    let mut a = accepted.unwrap();
    w.submit(Op::send(&s, b"ping".to_vec(), 0), ());
    assert_eq!(next(&mut w).result.unwrap(), 4);
    let mut got = [0u8; 4];
    a.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

/// A multishot operation posted through the `Port` from a thread that is no worker's: it
/// runs on its socket's home worker, every completion but the last marked `more`, each with a
/// clone of the per-I/O data.
fn multishot_submitted_from_another_thread_completes_on_the_home_worker(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u8>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, "listener").unwrap();
    let id = std::thread::scope(|s| {
        s.spawn(|| port.submit_multishot(Op::accept_multishot(&l), 5))
            .join()
            .unwrap()
    })
    .unwrap_or_else(|_| panic!("the worker is gone"));
    let clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let c = next(&mut w);
        assert_eq!((c.id, c.kind, c.data), (id, OpKind::Accept, 5));
        assert!(c.more, "the accept stays armed");
        peers.push(c.accepted.expect("a connection").peer_addr().unwrap());
    }
    let mut want: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    peers.sort();
    want.sort();
    assert_eq!(peers, want);
    w.cancel(id);
    let last = next(&mut w);
    assert_eq!((last.id, last.more), (id, false));
    assert!(last.is_cancelled(), "{:?}", last.result);
}

/// `workers(0)` builds one worker per core the process may run on.
#[test]
fn zero_workers_means_one_per_core() {
    let (port, workers) = Port::builder().workers(0).build::<(), ()>().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!((port.workers(), workers.len()), (cores, cores));
}

fn multishot_accept_takes_every_connection_until_cancelled(b: Backend) {
    let (port, mut w) = one_worker::<&'static str, u8>(b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, "listener").unwrap();
    // Posted as a single-shot operation: refused.
    w.submit(Op::accept_multishot(&l), 1);
    let c = next(&mut w);
    assert_eq!(
        c.result.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(c.accepted.is_none());

    // Three connections wait before it is armed, two more arrive after.
    let mut clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let id = w.submit_multishot(Op::accept_multishot(&l), 2);
    let mut accepted = Vec::new();
    for round in [3, 2] {
        if round == 2 {
            clients.extend((0..2).map(|_| TcpStream::connect(addr).unwrap()));
        }
        for _ in 0..round {
            let c = next(&mut w);
            assert_eq!((c.id, c.kind, c.data), (id, OpKind::Accept, 2));
            assert!(c.more, "the accept stays armed");
            assert_eq!(c.result.unwrap(), 0);
            accepted.push(c.accepted.expect("each completion carries a connection"));
        }
    }
    // Each client's connection was accepted once, and carries its bytes.
    let mut peers: Vec<_> = accepted.iter().map(|a| a.peer_addr().unwrap()).collect();
    let mut want: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    peers.sort();
    want.sort();
    assert_eq!(peers, want);
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&[i as u8]).unwrap();
    }
    for a in &mut accepted {
        let i = clients
            .iter()
            .position(|c| c.local_addr().unwrap() == a.peer_addr().unwrap())
            .unwrap();
        let mut got = [0u8; 1];
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        a.read_exact(&mut got).unwrap();
        assert_eq!(got[0], i as u8);
    }

    // A cancel ends it: a last completion without `more`.
    w.cancel(id);
    let c = next(&mut w);
    assert_eq!(c.id, id);
    assert!(!c.more);
    assert!(c.is_cancelled(), "{:?}", c.result);
    assert!(c.accepted.is_none());
}

/// An address where connecting is refused, and the socket that keeps it so: bound and not
/// listening, so that no other test can take the port meanwhile.
fn refusing_addr() -> (std::net::SocketAddr, socket2::Socket) {
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = held.local_addr().unwrap().as_socket().unwrap();
    (addr, held)
}

/// A new socket of `port`, whose connect to an address that refuses has failed, as asserted.
fn refused_socket(port: &Port<(), ()>, w: &mut Worker<(), ()>) -> Handle<()> {
    let (addr, _held) = refusing_addr();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let s = port.associate(sock, ()).unwrap();
    w.submit(Op::connect(&s, addr), ());
    let e = next(w).result.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
    s
}

fn connect_refused_is_named(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    refused_socket(&port, &mut w);
}

/// A socket whose first connect was refused and whose second one went through reports its
/// new connection's clean close as the end of the stream, not the old refusal.
fn a_socket_connected_again_after_a_refusal_ends_cleanly(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let s = refused_socket(&port, &mut w);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    w.submit(Op::connect(&s, listener.local_addr().unwrap()), ());
    next(&mut w).result.expect("the second connect");
    let (peer, _) = listener.accept().unwrap();
    drop(peer);
    w.submit(Op::recv(&s, Vec::with_capacity(16)), ());
    let c = next(&mut w);
    assert_eq!(c.result.as_ref().ok(), Some(&0), "{:?}", c.result);
}

/// A connect posted while an earlier connect's handshake goes on (that one cancelled) fails
/// with `EALREADY` on both backends, as `connect(2)` does.
fn a_second_connect_during_a_handshake_is_already_under_way(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    // A listener whose accept queue is full drops the next SYN: that handshake waits.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Connections nobody accepts fill the queue, until one's SYN goes unanswered.
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 64, "the listener's queue never filled");
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(c) => queued.push(c),
            Err(_) => break,
        }
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let s = port.associate(sock, ()).unwrap();
    let first = w.submit(Op::connect(&s, addr), 1);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    assert_eq!(w.cancel(first), CancelOutcome::Requested);
    let c = next(&mut w);
    assert!(c.is_cancelled(), "{:?}", c.result);
    w.submit(Op::connect(&s, addr), 2);
    let c = next(&mut w);
    assert_eq!(
        (c.data, c.result.unwrap_err().raw_os_error()),
        (2, Some(libc::EALREADY))
    );
}

/// A multishot accept on a descriptor that is not a socket fails with `ENOTSOCK` on both
/// backends (epoll cannot watch such a descriptor at all).
fn multishot_accept_on_a_file_is_not_a_socket(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let h = port
        .associate(std::fs::File::open("/dev/null").unwrap(), ())
        .unwrap();
    w.submit_multishot(Op::accept_multishot(&h), 1);
    let c = next(&mut w);
    assert!(!c.more);
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOTSOCK));
}

/// A receive posted on a socket still connecting sees the refusal too, and may see it first
/// (on epoll the read side runs before the write side): the connect still completes, with an
/// error, instead of waiting for an edge that has already passed.
fn connect_refused_completes_beside_a_receive(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (addr, _held) = refusing_addr();
    for _ in 0..20 {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let s = port.associate(sock, ()).unwrap();
        w.submit(Op::connect(&s, addr), 0);
        w.submit(Op::recv(&s, Vec::with_capacity(16)), 1);
        let mut seen = [false; 2];
        for _ in 0..2 {
            let c = next(&mut w);
            seen[usize::from(c.data)] = true;
            // Whichever of the two the kernel hands the refusal to, both report it (the other
            // finds the socket shut: the end of the stream, or `ECONNABORTED`).
            assert_eq!(
                os_result(&c),
                Err(Some(libc::ECONNREFUSED)),
                "{}",
                ["the connect", "the receive"][usize::from(c.data)]
            );
        }
        assert_eq!(seen, [true, true]);
    }
}

fn operations_run_on_the_home_worker(b: Backend) {
    let (port, workers) = Port::builder()
        .workers(2)
        .backend(b)
        .build::<usize, ()>()
        .unwrap();
    let [mut w0, mut w1]: [Worker<usize, ()>; 2] = workers.try_into().unwrap();
    let (a, mut pa) = pair();
    let (b, mut pb) = pair();
    // Least-loaded placement spreads two sockets over two workers.
    let ha = port.associate(a, 0).unwrap();
    let hb = port.associate(b, 1).unwrap();
    assert_ne!(ha.worker(), hb.worker());
    assert_eq!(port.loads(), vec![1, 1]);
    let (on0, on1) = if ha.worker() == 0 { (ha, hb) } else { (hb, ha) };
    // Worker 0 posts a receive on worker 1's socket: it completes on worker 1.
    w0.submit(Op::recv(&on1, Vec::with_capacity(8)), ());
    w1.submit(Op::recv(&on0, Vec::with_capacity(8)), ());
    pa.write_all(b"x").unwrap();
    pb.write_all(b"y").unwrap();
    let c1 = w1.dequeue(WAIT).unwrap();
    assert!(Handle::ptr_eq(c1.handle.as_ref().unwrap(), &on1));
    let c0 = w0.dequeue(WAIT).unwrap();
    assert!(Handle::ptr_eq(c0.handle.as_ref().unwrap(), &on0));
    drop((c0, c1, on0, on1));
    assert_eq!(port.loads(), vec![0, 0]);
}

fn shutdown_completes_in_flight_operations_then_reports_shutdown(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 2);
    w.submit(Op::timeout(Duration::from_secs(60)), 3);
    let p = port.clone();
    std::thread::spawn(move || p.shutdown()).join().unwrap();
    let mut seen = Vec::new();
    loop {
        match w.dequeue(WAIT) {
            Ok(c) => {
                assert!(c.is_cancelled(), "{:?}", c.result);
                seen.push(c.data);
            }
            Err(WaitError::Shutdown) => break,
            Err(e) => panic!("{e}"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3]);
    // Posting after shutdown completes at once, buffer included.
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 4);
    let c = next(&mut w);
    assert!(c.is_cancelled());
    assert!(c.buf.is_some());
}

/// Per-I/O data that counts its drops.
struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn dropping_a_worker_with_receives_in_flight_waits_for_the_kernel(b: Backend) {
    let drops = Arc::new(AtomicUsize::new(0));
    let (port, mut w) = one_worker::<(), Tracked>(b);
    let (ours, mut peer) = pair();
    // Keep our own descriptor for the socket, to look at it after the port is gone.
    let probe = TcpStream::from(ours.as_fd().try_clone_to_owned().unwrap());
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let h = port.associate(ours, ()).unwrap();
    for _ in 0..8 {
        w.submit(
            Op::recv(&h, Vec::with_capacity(1 << 16)),
            Tracked(drops.clone()),
        );
    }
    assert_eq!(w.in_flight(), 8);
    drop(w);
    // Every operation was given back by the kernel before its buffer and data were freed.
    assert_eq!(drops.load(Ordering::SeqCst), 8);
    // No receive is left in the kernel: bytes sent now are still in the socket for us, not
    // written into a freed buffer.
    peer.write_all(b"after drop").unwrap();
    let mut got = [0u8; 10];
    (&probe).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after drop");
    // Posting to a dropped worker is refused.
    assert!(port
        .submit(Op::recv(&h, Vec::with_capacity(8)), Tracked(drops.clone()))
        .is_err());
    assert!(port.post(0, Packet::new(Tracked(drops.clone()))).is_err());
    peer.shutdown(Shutdown::Both).unwrap();
}

/// Per-I/O data that logs its drop, and panics there if it is named "panics".
struct Probe {
    name: &'static str,
    log: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.log.lock().unwrap().push(self.name);
        if self.name == "panics" && !std::thread::panicking() {
            panic!("a per-I/O data's drop panics");
        }
    }
}

/// A worker dropped with a packet in its queue whose data panics when dropped: the receive in
/// the kernel is still given back before anything of the caller's is dropped (else its buffer
/// would be freed while the kernel may write it).
fn a_panicking_drop_while_a_worker_is_dropped_comes_after_the_kernel(b: Backend) {
    let (port, mut w) = one_worker::<(), Probe>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = |name| Probe {
        name,
        log: log.clone(),
    };
    w.submit(Op::recv(&h, Vec::with_capacity(64)), probe("receive"));
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    if port.post(0, Packet::new(probe("panics"))).is_err() {
        panic!("the worker is alive");
    }
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(w)));
    assert!(dropped.is_err(), "the packet's data panicked");
    assert_eq!(*log.lock().unwrap(), ["receive", "panics"]);
}

/// What is posted to a worker that is gone comes back to the caller unstarted: the operation
/// with its buffer (bytes already in it included) and per-I/O data, and the packet with its
/// handle and data, rather than being dropped with an error.
fn work_posted_to_a_dropped_worker_comes_back_whole(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(2)
        .backend(b)
        .build::<u8, u32>()
        .unwrap();
    let gone = workers.pop().unwrap();
    let mut w = workers.pop().unwrap();
    let (ours, _peer) = pair();
    let h = port.associate_with(1, ours, 9).unwrap();
    drop(gone);

    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(b"kept");
    let rejected = port.submit(Op::recv(&h, buf), 7).unwrap_err();
    let io_error = std::io::Error::from(port.submit(Op::close(&h), 8).unwrap_err());
    assert_eq!(io_error.kind(), std::io::ErrorKind::NotConnected);
    let (op, data) = rejected.into_inner();
    assert_eq!(data, 7);
    // The operation is whole: posted again (through a worker, which fails it at once for the
    // same reason), it gives back the buffer it was built with.
    w.submit(op, data);
    let c = next(&mut w);
    assert_eq!((c.kind, c.data, c.key()), (OpKind::Recv, 7, Some(&9)));
    assert!(c.is_cancelled());
    assert_eq!(c.buf.as_deref(), Some(&b"kept"[..]));

    // Packets, from the port and from a worker.
    let packet = Packet {
        bytes: 5,
        handle: Some(h.clone()),
        data: 11,
    };
    let back = port.post(1, packet).unwrap_err().into_inner();
    assert_eq!((back.bytes, back.data), (5, 11));
    assert!(back.handle.is_some_and(|k| Handle::ptr_eq(&k, &h)));
    let back = w.post(1, Packet::new(12)).unwrap_err().into_inner();
    assert_eq!(back.data, 12);
    // The live worker still takes packets.
    port.post(0, Packet::new(13)).unwrap();
    assert_eq!(next(&mut w).data, 13);
}

/// Work sent to a worker that has already answered `Shutdown` (its thread about to drop it)
/// comes back to the sender whole, rather than wait in a queue nobody takes from; work that
/// got in before the answer is failed first, with its buffer.
fn work_sent_after_the_shutdown_answer_comes_back(b: Backend) {
    let (port, mut w) = one_worker::<u8, u32>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, 9).unwrap();
    port.shutdown();
    // Sent before the worker drains: failed by it, buffer and all.
    let buf = |text: &[u8]| {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(text);
        v
    };
    port.submit(Op::recv(&h, buf(b"early")), 1).unwrap();
    let c = next(&mut w);
    assert_eq!(c.data, 1);
    assert!(c.is_cancelled());
    assert_eq!(c.buf.as_deref(), Some(&b"early"[..]));
    assert!(matches!(w.dequeue(WAIT), Err(WaitError::Shutdown)));
    // After the answer.
    let (op, data) = port
        .submit(Op::recv(&h, buf(b"late")), 2)
        .unwrap_err()
        .into_inner();
    assert_eq!(data, 2);
    let back = port.post(0, Packet::new(3)).unwrap_err().into_inner();
    assert_eq!(back.data, 3);
    // Still whole: through the worker itself, it fails with its buffer.
    w.submit(op, data);
    let c = next(&mut w);
    assert!(c.is_cancelled());
    assert_eq!(c.buf.as_deref(), Some(&b"late"[..]));
}

/// Dropping a worker with a multishot accept and pooled receives armed: the kernel gives
/// everything back first, and connections accepted but never handed out are closed (their
/// clients see the end of the stream, not a connection that hangs open).
fn dropping_a_worker_with_multishot_operations_armed_closes_what_it_accepted(b: Backend) {
    let (port, mut w) = pooled_worker_with(b, 4096, 8, true);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = port.associate(listener, 0).unwrap();
    w.submit_multishot(Op::accept_multishot(&l), 1);
    // One connection accepted and receiving into the pool.
    let mut first = TcpStream::connect(addr).unwrap();
    let c = next(&mut w);
    let stream = c.accepted.expect("an accepted connection");
    let h = port.associate(stream, 1).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 2);
    first.write_all(b"ping").unwrap();
    let c = next(&mut w);
    assert_eq!((c.data, c.result.as_ref().ok().copied()), (2, Some(4)));
    assert!(c.more);
    drop(c);
    // More clients connect; whatever the worker takes of them before it is dropped, it never
    // hands out.
    let mut later: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let _ = w.dequeue(Some(Duration::from_millis(50)));
    drop(w);
    drop((h, l, port));
    for c in &mut later {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        match c.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes from a connection nobody served"),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "a client left hanging: {e}"
            ),
        }
    }
    // The first connection's handle is gone too: its client sees the end.
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 8];
    match first.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes after the port was dropped"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

fn receive_without_spare_capacity_is_refused(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::new()), ());
    let c = next(&mut w);
    assert_eq!(
        c.result.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}

/// A send whose offset lies past the end of its buffer is refused, not sent as nothing (a
/// loop that posts the rest until it is sent would spin).
fn send_offset_past_the_end_is_refused(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::send(&h, b"abc".to_vec(), 4), ());
    let c = next(&mut w);
    assert_eq!(
        c.result.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert_eq!(c.buf.as_deref(), Some(&b"abc"[..]), "the buffer comes back");
    // At the end exactly: nothing left to send.
    w.submit(Op::send(&h, b"abc".to_vec(), 3), ());
    assert_eq!(next(&mut w).result.unwrap(), 0);
}

/// A handle tells its addresses and shuts a direction down: the peer sees the end of the
/// stream, and the other direction still works.
fn handle_addresses_and_shutdown(b: Backend) {
    let (port, mut w) = one_worker::<(), ()>(b);
    let (ours, mut peer) = pair();
    let (local, remote) = (ours.local_addr().unwrap(), ours.peer_addr().unwrap());
    let h = port.associate(ours, ()).unwrap();
    assert_eq!(h.local_addr().unwrap(), local);
    assert_eq!(h.peer_addr().unwrap(), remote);
    h.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    peer.write_all(b"still open").unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(64)), ());
    let c = next(&mut w);
    assert_eq!(c.buf.as_deref(), Some(&b"still open"[..]));
}

fn pooled_worker(b: Backend, size: usize, count: u16) -> (Port<u8, u8>, Worker<u8, u8>) {
    pooled_worker_with(b, size, count, false)
}

/// A worker with a receive pool, filled incrementally on io_uring if `incremental`.
fn pooled_worker_with(
    b: Backend,
    size: usize,
    count: u16,
    incremental: bool,
) -> (Port<u8, u8>, Worker<u8, u8>) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .recv_pool(size, count)
        .recv_pool_incremental(incremental)
        .build::<u8, u8>()
        .unwrap();
    (port, workers.pop().unwrap())
}

/// A send cancelled part-way leaves a gap in the stream: the send held behind it is cancelled
/// too, rather than put its bytes after the gap.
fn a_send_cut_short_cancels_the_sends_held_behind_it(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let data = numbered(64 << 20, 8);
    let first = w.submit(Op::send(&h, data.clone(), 0), 1);
    w.submit(Op::send(&h, b"after the gap".to_vec(), 0), 2);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    w.cancel(first);
    let mut got = [None, None];
    for _ in 0..2 {
        let c = next(&mut w);
        let at = usize::from(c.data - 1);
        got[at] = Some(c);
    }
    let [Some(a), Some(b)] = got else {
        panic!("one completion for each send")
    };
    let n = *a.result.as_ref().expect("the count of what went");
    assert!(n < data.len());
    assert!(b.is_cancelled(), "the send behind: {:?}", b.result);
    drop((a, b, h));
    // Only the first send's part went out.
    assert_peer_got_exactly(peer, &data[..n]);
}

/// A send cut short leaves a gap until its completion is handed out: a send posted before
/// then (here in answer to another completion dequeued first) is cancelled too, whether the
/// worker had already seen the gap or still held the send behind it; one posted after it has
/// been handed out goes.
fn sends_posted_before_a_gap_is_handed_out_are_cancelled(b: Backend) {
    gap_until_handed_out(b, false);
}

/// As above, with completions taken a batch at a time: a batch ends before a send that left a
/// gap, so that the caller has it before it answers anything behind it.
fn sends_posted_before_a_gap_is_handed_out_in_a_batch_are_cancelled(b: Backend) {
    gap_until_handed_out(b, true);
}

/// Completions one at a time, or a batch at a time and then one by one from it.
struct Taker {
    batch: bool,
    taken: std::collections::VecDeque<Completion<usize, u8>>,
}

impl Taker {
    fn next(&mut self, w: &mut Worker<usize, u8>) -> Completion<usize, u8> {
        if !self.batch {
            return next(w);
        }
        if self.taken.is_empty() {
            let mut batch = Vec::new();
            w.dequeue_batch(&mut batch, 16, WAIT)
                .expect("a completion within 10 s");
            self.taken.extend(batch);
        }
        self.taken.pop_front().expect("a batch of at least one")
    }
}

fn gap_until_handed_out(b: Backend, batch: bool) {
    let mut taker = Taker {
        batch,
        taken: std::collections::VecDeque::new(),
    };
    let (port, mut w) = one_worker::<usize, u8>(b);
    let data = numbered(64 << 20, 9);
    let mut socks = Vec::new();
    let mut peers = Vec::new();
    for i in 0..2 {
        let (ours, peer) = pair();
        let h = port.associate(ours, i).unwrap();
        let id = w.submit(Op::send(&h, data.clone(), 0), 1);
        socks.push((h, id));
        peers.push(peer);
    }
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    // Both cancels reach the kernel in the same turn.
    for (_, id) in &socks {
        w.cancel(*id);
    }
    let first = taker.next(&mut w);
    assert_eq!(first.data, 1);
    let went_first = *first.result.as_ref().expect("the count of what went");
    let first_at = *first.key().unwrap();
    let other = 1 - first_at;
    let h = socks[other].0.clone();
    w.submit(Op::send(&h, b"before the gap is seen".to_vec(), 0), 2);
    let (mut went, mut before, mut after) = (None, None, None);
    while went.is_none() || before.is_none() || after.is_none() {
        let c = taker.next(&mut w);
        match c.data {
            1 => {
                went = Some(*c.result.as_ref().expect("the count of what went"));
                w.submit(Op::send(&h, b"after".to_vec(), 0), 3);
            }
            2 => before = Some(c),
            _ => after = Some(c),
        }
    }
    let (went, before, after) = (went.unwrap(), before.unwrap(), after.unwrap());
    assert!(
        before.is_cancelled(),
        "a send posted before the gap was handed out: {:?}",
        before.result
    );
    assert_eq!(after.result.as_ref().ok(), Some(&5), "{:?}", after.result);
    drop((first, before, after, h, socks, w, port));
    let mut peers = peers.into_iter();
    let (p0, p1) = (peers.next().unwrap(), peers.next().unwrap());
    let (first_peer, other_peer) = if first_at == 0 { (p0, p1) } else { (p1, p0) };
    assert_peer_got_exactly(first_peer, &data[..went_first]);
    let mut expected = data[..went].to_vec();
    expected.extend_from_slice(b"after");
    assert_peer_got_exactly(other_peer, &expected);
}

/// A send cancelled in the kernel before any of its bytes went is only taken out, as a queued
/// one is: the send queued behind it goes (no gap). A partial send fills the socket's buffer
/// first (a Unix stream: no room opens until the peer reads), so the one cancelled waits for
/// room with nothing sent.
fn a_send_cancelled_before_any_of_it_went_lets_the_next_go(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let h = port.associate(ours, ()).unwrap();
    let filler = numbered(16 << 20, 3);
    w.submit(Op::send(&h, filler.clone(), 0).partial(), 0);
    let c = next(&mut w);
    let filled = *c.result.as_ref().expect("what the socket took");
    assert!(filled < filler.len());
    let cancelled = w.submit(Op::send(&h, numbered(1 << 20, 4), 0), 1);
    w.submit(Op::send(&h, b"next".to_vec(), 0), 2);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    w.cancel(cancelled);
    let c = next(&mut w);
    assert_eq!(c.data, 1);
    assert!(
        c.is_cancelled(),
        "a send waiting for room, nothing of it sent: {:?}",
        c.result
    );
    let len = filled + 4;
    let reading = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        peer.read_exact(&mut got).map(|()| got)
    });
    let c = next(&mut w);
    assert_eq!(
        (c.data, c.result.as_ref().ok()),
        (2, Some(&4)),
        "{:?}",
        c.result
    );
    let got = reading.join().unwrap().unwrap();
    assert!(got[..filled] == filler[..filled], "the filler's bytes");
    assert_eq!(&got[filled..], b"next");
}

/// A peer that resets the connection while a receive waits and a send waits for room: the
/// receive reports the reset (`ECONNRESET`), not an end of stream, whichever operation the
/// kernel hands the socket's error to; the send completes with what went.
fn a_reset_reaches_the_waiting_receive(b: Backend) {
    let (_port, mut w, _h) = reset_while_a_send_waits(b, true);
    let (mut recv, mut send) = (None, None);
    while recv.is_none() || send.is_none() {
        let c = next(&mut w);
        if c.data == 1 {
            recv = Some(c);
        } else {
            send = Some(c);
        }
    }
    assert_eq!(
        os_result(&recv.unwrap()),
        Err(Some(libc::ECONNRESET)),
        "the receive waiting when the peer reset"
    );
}

/// Writes `byte`s to the non-blocking `socket` until its send buffer and its peer's receive
/// buffer are full for good: until a write finds no room even after a pause (the first
/// `EAGAIN` may come while acknowledgements on their way would free room). How many went.
fn fill_for_good(mut socket: &TcpStream, byte: u8) -> usize {
    use std::io::Write;
    let chunk = vec![byte; 64 << 10];
    let mut filled = 0;
    for _ in 0..200 {
        let mut wrote = false;
        loop {
            match socket.write(&chunk) {
                Ok(n) => {
                    filled += n;
                    wrote = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the send buffer: {e}"),
            }
        }
        if !wrote {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    filled
}

/// A peer that resets the connection while a receive waits and a send waits for room with
/// nothing of it sent (the socket's buffer already full): both report the reset
/// (`ECONNRESET`), not the send `EPIPE` for finding the socket merely shut after the receive
/// took the error, whichever operation the kernel hands it to.
fn a_reset_reaches_a_send_waiting_beside_a_receive(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, peer) = pair();
    ours.set_nonblocking(true).unwrap();
    fill_for_good(&ours, 0);
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(4096)), 1);
    w.submit(Op::send(&h, numbered(1000, 3), 0), 3);
    reset_once_all_wait(&mut w, peer);
    for _ in 0..2 {
        let c = next(&mut w);
        assert_eq!(
            os_result(&c),
            Err(Some(libc::ECONNRESET)),
            "operation {} when the peer reset",
            c.data
        );
    }
}

/// Checks that nothing completes for 200 ms (what was posted waits), then has `peer` reset
/// the connection (`SO_LINGER` 0).
fn reset_once_all_wait(w: &mut Worker<(), u8>, peer: TcpStream) {
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    socket2::SockRef::from(&peer)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(peer);
}

/// A connection whose peer resets it (`SO_LINGER` 0) while a 64 MiB send (data 2) waits for
/// room, behind a receive (data 1) posted first when `recv_first`: the port, its worker and
/// our end.
fn reset_while_a_send_waits(
    b: Backend,
    recv_first: bool,
) -> (Port<(), u8>, Worker<(), u8>, Handle<()>) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    if recv_first {
        w.submit(Op::recv(&h, Vec::with_capacity(4096)), 1);
    }
    w.submit(Op::send(&h, numbered(64 << 20, 2), 0), 2);
    reset_once_all_wait(&mut w, peer);
    (port, w, h)
}

/// A completion's result as its count or its errno.
fn os_result<K, D>(c: &Completion<K, D>) -> Result<usize, Option<i32>> {
    c.result
        .as_ref()
        .map_err(std::io::Error::raw_os_error)
        .copied()
}

/// A reset that a waiting send takes from the kernel reaches a receive posted afterwards (which
/// the kernel would let find only the end of the stream), the same on both backends.
fn a_reset_seen_by_a_send_reaches_a_later_receive(b: Backend) {
    let (_port, mut w, h) = reset_while_a_send_waits(b, false);
    let send = next(&mut w);
    assert_eq!(send.data, 2);
    w.submit(Op::recv(&h, Vec::with_capacity(4096)), 1);
    assert_eq!(
        os_result(&next(&mut w)),
        Err(Some(libc::ECONNRESET)),
        "a receive after the send saw the reset (the send: {:?})",
        send.result
    );
}

/// A send cancelled as soon as it is posted, before the worker has seen that the kernel took
/// only part of it (one way by its id, one way with all of its socket's operations): the
/// rest is not sent after the cancel; it completes with the count that went.
fn a_send_cancelled_before_its_part_is_seen_goes_no_further(b: Backend) {
    for by_id in [true, false] {
        let (port, mut w) = one_worker::<(), ()>(b);
        let (ours, peer) = pair();
        let h = port.associate(ours, ()).unwrap();
        let data = numbered(64 << 20, 6);
        let id = w.submit(Op::send(&h, data.clone(), 0), ());
        if by_id {
            w.cancel(id);
        } else {
            w.cancel_all(&h);
        }
        let c = next(&mut w);
        let n = *c.result.as_ref().expect("the count of what went");
        assert!(
            n < data.len(),
            "all of 64 MiB went to a peer that reads nothing"
        );
        drop((c, h));
        assert_peer_got_exactly(peer, &data[..n]);
    }
}

/// A gathering send larger than the socket buffers hold goes on from where the kernel
/// stopped, across its buffers, and completes once all of it has gone: 16 MiB received into
/// pool buffers and sent back in one gather (3 bytes into the first) to a peer that reads only
/// later.
fn a_gathering_send_goes_on_across_its_buffers(b: Backend) {
    const LEN: usize = 16 << 20;
    let (port, mut w) = pooled_worker(b, 64 << 10, 1024);
    let (ours, peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    let data = numbered(LEN, 5);
    let mut writer = peer.try_clone().unwrap();
    let sent = data.clone();
    let writing = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut bufs = Vec::new();
    let mut received = 0;
    while received < LEN {
        let c = next(&mut w);
        if !c.more {
            // Ended (on io_uring the buffer ring can run dry while the pool has buffers, see
            // `Op::recv_pooled`): posted again.
            let e = c
                .result
                .as_ref()
                .err()
                .and_then(std::io::Error::raw_os_error);
            assert!(
                c.pooled.is_some() || e == Some(libc::ENOBUFS),
                "{:?}",
                c.result
            );
            w.submit_multishot(Op::recv_pooled(&h), 0);
        }
        if let Some(buf) = c.pooled {
            received += buf.len();
            bufs.push(buf);
        }
    }
    writing.join().unwrap();
    assert_eq!(received, LEN);
    w.submit(Op::send_pooled_gather(&h, bufs, 3), 1);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(200))),
        Err(WaitError::TimedOut)
    ));
    let reader = read_on_thread(peer, LEN - 3);
    let c = next(&mut w);
    assert_eq!((c.kind, c.data), (OpKind::Send, 1));
    assert_eq!(c.result.unwrap(), LEN - 3);
    let got = reader.join().unwrap();
    let at = got.iter().zip(&data[3..]).position(|(g, e)| g != e);
    assert_eq!(
        at, None,
        "the bytes differ from those sent, first at this offset"
    );
}

fn pooled_receive_completes_many_times_and_holds_no_buffer_while_idle(b: Backend) {
    let (port, mut w) = pooled_worker(b, 64, 8);
    let mut peers = Vec::new();
    let mut handles = Vec::new();
    for i in 0..12 {
        let (ours, peer) = pair();
        let h = port.associate(ours, i).unwrap();
        w.submit_multishot(Op::recv_pooled(&h), i);
        handles.push(h);
        peers.push(peer);
    }
    // Twelve connections waiting for input, more than the pool has buffers: none is taken (none
    // of the receives fails for want of one).
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    assert_eq!(w.pool_available(), 8);
    // Each of them receives in turn, into a buffer that comes back once its data is dropped.
    for (i, peer) in peers.iter_mut().enumerate().skip(3) {
        peer.write_all(&[i as u8]).unwrap();
        let c = next(&mut w);
        assert_eq!(
            (usize::from(c.data), c.pooled.as_deref()),
            (i, Some(&[i as u8][..]))
        );
        assert!(c.more);
    }

    let mut got = Vec::new();
    for chunk in [&b"abc"[..], b"defgh", b"ij"] {
        peers[2].write_all(chunk).unwrap();
        let c = next(&mut w);
        assert_eq!(c.kind, OpKind::RecvPooled);
        assert!(c.more, "a pooled receive stays armed");
        assert_eq!(c.data, 2);
        assert_eq!(c.key(), Some(&2));
        let buf = c.pooled.expect("data comes in a pool buffer");
        assert_eq!(c.result.unwrap(), buf.len());
        got.extend_from_slice(&buf);
        // Echo it straight from the pool buffer.
        w.submit(Op::send_pooled(&handles[2], buf, 0), 99);
        let s = next(&mut w);
        assert_eq!(s.kind, OpKind::Send);
        assert!(s.pooled.is_some(), "a pooled send gives its buffer back");
    }
    assert!(got.starts_with(b"abc"));
    assert_eq!(got, b"abcdefghij");
    let mut echoed = [0u8; 10];
    peers[2].read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"abcdefghij");
    // Every buffer is back once the completions are dropped.
    assert_eq!(w.pool_available(), 8);

    drop(peers.remove(2));
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), 0, "the peer closed");
    assert!(!c.more, "end of stream ends the multishot receive");
}

/// Receives fill a pool buffer one after another, whichever socket they are on: small messages
/// share a buffer, which goes back to the pool once full and no longer referenced.
fn small_receives_share_a_pool_buffer(b: Backend) {
    // io_uring fills whole buffers unless asked; epoll always shares.
    let (_, whole) = pooled_worker(b, 16, 1);
    assert_eq!(whole.pool_shares_buffers(), b == Backend::Epoll);
    let (port, mut w) = pooled_worker_with(b, 16, 1, true);
    if !shares_buffers_or_skips(b, &w) {
        return;
    }
    let (a, mut peer_a) = pair();
    let (bb, mut peer_b) = pair();
    let ha = port.associate(a, 0).unwrap();
    let hb = port.associate(bb, 1).unwrap();
    w.submit_multishot(Op::recv_pooled(&ha), 0);
    w.submit_multishot(Op::recv_pooled(&hb), 1);
    let mut held = Vec::new();
    for (chunk, from) in [(&b"hello"[..], 0u8), (b"world", 1), (b"!", 0)] {
        let peer = if from == 0 { &mut peer_a } else { &mut peer_b };
        peer.write_all(chunk).unwrap();
        let c = next(&mut w);
        assert_eq!(c.data, from);
        assert!(c.more);
        let buf = c.pooled.expect("data comes in a pool buffer");
        assert_eq!(&buf[..], chunk);
        held.push(buf);
    }
    // Three receives held at once from a pool of one buffer, each its own bytes.
    let got: Vec<&[u8]> = held.iter().map(|b| &b[..]).collect();
    assert_eq!(got, [&b"hello"[..], b"world", b"!"]);
    assert_eq!(w.pool_available(), 1, "the buffer is not full yet");

    // Eight bytes for the buffer's last five: it fills, and the rest finds no buffer.
    peer_b.write_all(b"ABCDEFGH").unwrap();
    let c = next(&mut w);
    assert_eq!(c.pooled.as_deref(), Some(&b"ABCDE"[..]));
    held.push(c.pooled.unwrap());
    let c = next(&mut w);
    assert_eq!(c.data, 1);
    let e = c.result.expect_err("no buffer left");
    assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS));
    assert_eq!(w.pool_available(), 0);
    assert_eq!(&held[0][..], b"hello", "earlier slices are untouched");

    // Dropping every slice gives the buffer back; the bytes still waiting arrive intact.
    held.pop();
    assert_eq!(w.pool_available(), 0, "one slice still holds it");
    held.clear();
    assert_eq!(w.pool_available(), 1);
    w.submit_multishot(Op::recv_pooled(&hb), 2);
    let c = next(&mut w);
    assert_eq!(c.data, 2);
    assert_eq!(c.pooled.as_deref(), Some(&b"FGH"[..]));
}

/// With a working set of one buffer out of three, a buffer that user hands keep comes to count
/// as parked and another circulates in its place: a connection that holds on to its bytes does
/// not stop the others, and every byte stays where it was received. (Were the held buffer never
/// parked, the second connection would find no buffer however long it waited.)
fn a_pool_buffer_held_on_to_is_parked_and_another_circulates(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .recv_pool(8, 3)
        .recv_pool_working_set(1)
        .build::<u8, u8>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    let (a, mut peer_a) = pair();
    let (bb, mut peer_b) = pair();
    let ha = port.associate(a, 0).unwrap();
    let hb = port.associate(bb, 1).unwrap();
    w.submit_multishot(Op::recv_pooled(&ha), 0);
    peer_a.write_all(b"12345678").unwrap();
    let held = next(&mut w).pooled.expect("a's bytes fill a buffer");
    assert_eq!(&held[..], b"12345678");
    // Two buffers free, but the working set is out (until the worker's next wait at the
    // earliest, which is when a held buffer can be counted as parked).
    assert_eq!(w.pool_available(), 0);
    assert_eq!(w.pool_in_use(), 1);

    let mut armed = true;
    w.submit_multishot(Op::recv_pooled(&hb), 1);
    peer_b.write_all(b"abcdefgh").unwrap();
    let deadline = Instant::now() + WAIT.unwrap();
    let got = loop {
        assert!(Instant::now() < deadline, "b never got a buffer");
        match w.dequeue(Some(Duration::from_millis(20))) {
            // a's receive may end for want of a buffer, with nothing received.
            Ok(c) if c.data == 0 => assert_eq!(
                c.result.err().and_then(|e| e.raw_os_error()),
                Some(libc::ENOBUFS),
                "a's peer sent nothing more"
            ),
            Ok(c) => match c.result {
                Ok(_) => break c.pooled.expect("b's bytes in a pool buffer"),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => armed = false,
                Err(e) => panic!("b's receive failed: {e}"),
            },
            Err(WaitError::TimedOut) => {}
            Err(e) => panic!("wait failed: {e}"),
        }
        if !armed && w.pool_available() > 0 {
            w.submit_multishot(Op::recv_pooled(&hb), 1);
            armed = true;
        }
    };
    assert_eq!(&got[..], b"abcdefgh");
    assert_eq!(&held[..], b"12345678", "the parked buffer keeps its bytes");
    assert_eq!(w.pool_in_use(), 2, "a and b each hold a whole buffer");
    assert_ne!(got.buffer_index(), held.buffer_index());
}

/// Whether `w`'s pool buffers are filled incrementally, small receives sharing one, as asked:
/// always on epoll, and on io_uring from Linux 6.12 (`IOU_PBUF_RING_INC`). On an older kernel
/// says that the test is skipped.
fn shares_buffers_or_skips<K: Send + Sync + 'static, D: Send + 'static>(
    b: Backend,
    w: &Worker<K, D>,
) -> bool {
    if b == Backend::Epoll || kernel_at_least(6, 12) {
        assert!(w.pool_shares_buffers(), "{b:?}: buffers are not shared");
    }
    if !w.pool_shares_buffers() {
        println!("SKIPPED: this kernel's io_uring fills whole buffers only (Linux 6.12)");
    }
    w.pool_shares_buffers()
}

/// Slices of one shared buffer, at different offsets, go out in one gathering send and come
/// back; dropped on another thread, they return the buffer once it is full.
fn slices_of_a_shared_buffer_gather_and_return_from_another_thread(b: Backend) {
    let (port, mut w) = pooled_worker_with(b, 16, 1, true);
    if !shares_buffers_or_skips(b, &w) {
        return;
    }
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    let mut bufs = Vec::new();
    for chunk in [&b"abc"[..], b"defgh", b"ij"] {
        peer.write_all(chunk).unwrap();
        bufs.push(next(&mut w).pooled.expect("a slice"));
    }
    w.submit(Op::send_pooled_gather(&h, bufs, 1), 9);
    let c = next(&mut w);
    assert_eq!(c.data, 9);
    assert_eq!(c.result.unwrap(), 9);
    let mut echoed = [0u8; 9];
    peer.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"bcdefghij");
    let back = c.gathered;
    assert_eq!(back.iter().map(|b| b.len()).sum::<usize>(), 10);

    // Six more bytes fill the buffer; its slices are dropped by another thread.
    peer.write_all(b"klmnop").unwrap();
    let last = next(&mut w).pooled.expect("the buffer's last six bytes");
    assert_eq!(&last[..], b"klmnop");
    assert_eq!(w.pool_available(), 0);
    std::thread::spawn(move || drop((back, last)))
        .join()
        .unwrap();
    assert_eq!(w.pool_available(), 1);
    // The buffer is used again from its start, and the bytes are the new ones.
    peer.write_all(b"qrstuvwxyz012345").unwrap();
    let c = next(&mut w);
    assert_eq!(c.pooled.as_deref(), Some(&b"qrstuvwxyz012345"[..]));
}

/// Receives share pool buffers, which would cut datagrams short: refused on anything but a
/// stream socket, and nothing is read.
fn pooled_receive_on_a_datagram_socket_is_refused(b: Backend) {
    let (port, mut w) = pooled_worker(b, 64, 4);
    let ours = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = ours.local_addr().unwrap();
    let h = port.associate(ours.try_clone().unwrap(), 0).unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"datagram", addr).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    let c = next(&mut w);
    let e = c.result.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("not a stream"), "{e}");
    assert!(!c.more);
    let mut got = [0u8; 16];
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, _) = ours.recv_from(&mut got).unwrap();
    assert_eq!(&got[..n], b"datagram", "the datagram is still there, whole");
}

/// With every pool buffer in user hands, a pooled receive ends with `ENOBUFS` whether or not
/// data is waiting: posted on an idle connection, or armed when the peer's FIN comes. Both
/// backends, as io_uring picks the buffer before it looks at the socket.
fn pooled_receive_without_a_buffer_ends_even_with_no_data(b: Backend) {
    let (port, mut w) = pooled_worker(b, 16, 2);
    let (busy, mut busy_peer) = pair();
    let (idle, _idle_peer) = pair();
    let (closing, closing_peer) = pair();
    let (reset, reset_peer) = pair();
    let hb = port.associate(busy, 0).unwrap();
    let hi = port.associate(idle, 1).unwrap();
    let hc = port.associate(closing, 2).unwrap();
    let hr = port.associate(reset, 4).unwrap();
    // Armed while buffers are free.
    w.submit_multishot(Op::recv_pooled(&hc), 2);
    w.submit_multishot(Op::recv_pooled(&hr), 4);
    w.submit_multishot(Op::recv_pooled(&hb), 0);
    let mut held = Vec::new();
    while held.len() < 2 {
        busy_peer.write_all(b"0123456789abcdef").unwrap();
        let c = next(&mut w);
        assert_eq!(c.data, 0);
        held.push(c.pooled.expect("a whole buffer"));
    }
    assert_eq!(w.pool_available(), 0);
    // Posted with the pool empty, on a connection with nothing to read.
    w.submit_multishot(Op::recv_pooled(&hi), 1);
    let c = next(&mut w);
    assert_eq!(c.data, 1);
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOBUFS));
    assert!(!c.more);
    // The peer's FIN on an armed one, and a reset on another.
    drop(closing_peer);
    socket2::SockRef::from(&reset_peer)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset_peer);
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let c = next(&mut w);
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOBUFS));
        assert!(!c.more);
        ended.push(c.data);
    }
    ended.sort_unstable();
    assert_eq!(ended, [2, 4]);
    // With buffers back, posted again: the FIN reads as the end of the stream, and the reset
    // as the reset (not lost on the way).
    drop(held);
    w.submit_multishot(Op::recv_pooled(&hc), 3);
    let c = next(&mut w);
    assert_eq!((c.data, c.result.unwrap()), (3, 0));
    w.submit_multishot(Op::recv_pooled(&hr), 5);
    let c = next(&mut w);
    assert_eq!(c.data, 5);
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ECONNRESET));
}

fn pooled_receive_ends_with_enobufs_when_the_pool_runs_dry(b: Backend) {
    let (port, mut w) = pooled_worker(b, 16, 2);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    let mut held = Vec::new();
    let mut ended = None;
    for _ in 0..3 {
        peer.write_all(b"0123456789abcdef").unwrap();
        let c = next(&mut w);
        match c.result {
            Ok(n) => {
                assert_eq!(n, 16);
                held.push(c.pooled.unwrap());
            }
            Err(e) => {
                ended = Some((e, c.more));
                break;
            }
        }
    }
    let (e, more) = ended.expect("the third receive finds no buffer");
    assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS));
    assert!(!more);
    assert_eq!(held.len(), 2);
    assert_eq!(w.pool_available(), 0);
    // Give the buffers back, post again: the data still waiting in the socket arrives intact.
    drop(held);
    assert_eq!(w.pool_available(), 2);
    w.submit_multishot(Op::recv_pooled(&h), 1);
    let c = next(&mut w);
    assert_eq!(c.pooled.as_deref(), Some(&b"0123456789abcdef"[..]));
}

/// The byte at `i` of the stream the cancel tests send.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Checks that `buf` is the stream from offset `at` on.
fn assert_stream_at(buf: &[u8], at: usize) {
    for (i, byte) in buf.iter().enumerate() {
        assert_eq!(*byte, pattern(at + i), "byte {} of the stream", at + i);
    }
}

/// A pooled receive cancelled again and again while the peer streams: whatever the kernel had
/// received before each cancel took effect comes in its completions, the rest waits in the
/// socket for the next receive, so the bytes arrive whole and in order, and every buffer goes
/// back to the pool.
fn cancelling_a_pooled_receive_while_data_streams_loses_nothing(b: Backend) {
    const TOTAL: usize = 4 << 20;
    let (port, mut w) = pooled_worker_with(b, 4096, 64, true);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    // The writer starts once the first receive is cancelled: that one is surely still armed,
    // with nothing to read, when its cancel comes. (Later cancels may find their receive ended
    // already, by a dry pool, when the writer runs ahead.)
    let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        let _ = wait_for_go.recv();
        for chunk in data.chunks(1000) {
            peer.write_all(chunk).unwrap();
        }
        peer.shutdown(Shutdown::Write).unwrap();
        peer
    });
    let mut go = Some(go);
    let mut got = 0usize;
    let mut cancels = 0;
    let mut cancelled_ends = 0;
    'stream: loop {
        let op = w.submit_multishot(Op::recv_pooled(&h), 0);
        // Cancel after at most 64 KiB, or at once on every fourth arming (the first included).
        let cancel_at = if cancels % 4 == 0 {
            got
        } else {
            got + (64 << 10)
        };
        let mut asked = false;
        loop {
            if !asked && got >= cancel_at {
                w.cancel(op);
                asked = true;
                cancels += 1;
                if let Some(go) = go.take() {
                    go.send(()).unwrap();
                }
            }
            let c = next(&mut w);
            assert_eq!(c.kind, OpKind::RecvPooled);
            match c.result {
                Ok(0) => {
                    assert!(!c.more);
                    break 'stream;
                }
                Ok(n) => {
                    let buf = c.pooled.expect("data comes in a pool buffer");
                    assert_eq!(buf.len(), n);
                    assert_stream_at(&buf, got);
                    got += n;
                }
                Err(_) if c.is_cancelled() => cancelled_ends += 1,
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "{e}"),
            }
            if !c.more {
                break;
            }
        }
    }
    let _peer = writer.join().unwrap();
    assert_eq!(got, TOTAL, "every byte arrives once, in order");
    assert!(cancels >= 8, "only {cancels} cancels");
    assert!(cancelled_ends > 0, "no receive ended by its cancel");
    assert_eq!(w.pool_available(), 64, "every buffer is back in the pool");
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Waits (up to 10 s) until `h` has at least `n` bytes to read: what a peer wrote has arrived
/// (loopback may deliver it a moment later, from a softirq).
fn wait_readable<K>(h: &Handle<K>, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.readable_bytes().unwrap() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} bytes arrived",
            h.readable_bytes().unwrap()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// TCP urgent data between two runs of ordinary data: a read stops short at its mark with the
/// rest already waiting, and the pooled receive still takes the rest (the urgent byte itself
/// is not in the stream).
fn pooled_receive_reads_past_an_urgent_mark(b: Backend) {
    let (port, mut w) = pooled_worker(b, 4096, 8);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    // Each write its own segment, all in before the worker looks.
    peer.set_nodelay(true).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    peer.write_all(b"hello").unwrap();
    socket2::SockRef::from(&peer)
        .send_out_of_band(b"!")
        .unwrap();
    peer.write_all(b"world").unwrap();
    // Every byte in, before the worker looks: the peer's side has them all acknowledged
    // (`FIONREAD` here counts only up to the mark).
    let sender = port.associate(peer.try_clone().unwrap(), 1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sender.unacked_bytes().unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(sender);
    let mut got = Vec::new();
    while got.len() < 10 {
        let c = next(&mut w);
        got.extend_from_slice(&c.pooled.expect("data"));
    }
    assert_eq!(got, b"helloworld");
}

/// A Unix stream socket's read stops after a message that carries descriptors, with more
/// already waiting behind it: the pooled receive still takes the rest. (On epoll a read short
/// of its buffer means an empty socket for TCP only.)
fn pooled_receive_reads_past_a_message_with_descriptors(b: Backend) {
    use std::os::fd::AsRawFd;
    let (port, mut w) = pooled_worker(b, 4096, 8);
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(20))),
        Err(WaitError::TimedOut)
    ));
    // Both in before the worker looks: "a" with a descriptor, then "rest".
    let passed = std::fs::File::open("/proc/self/stat").unwrap();
    let mut iov = libc::iovec {
        iov_base: b"a".as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let fd_len = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` describes `control`, which has room for one header and one descriptor
    // (`CMSG_SPACE`), so the first header is in it and its data holds a c_int; `iov` points
    // at one live byte. sendmsg only reads them.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            passed.as_raw_fd(),
        );
        libc::sendmsg(peer.as_raw_fd(), &msg, 0)
    };
    assert_eq!(sent, 1, "sendmsg: {}", std::io::Error::last_os_error());
    (&peer).write_all(b"rest").unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let c = w
            .dequeue(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("after {got:?}: {e:?}: the rest waits unread"));
        got.extend_from_slice(&c.pooled.expect("data"));
    }
    assert_eq!(got, b"arest");
}

/// Receives with a byte limit on several sockets, sharing pool buffers that fill a piece at a
/// time: each completion's bytes are its own socket's (a receive that ends at its limit must
/// not be given the place in a shared buffer of one that completed around it). Once with
/// receives that mostly end at their first completion, once with longer ones on a ring whose
/// kernel work runs in batches.
fn limited_receives_sharing_pool_buffers_each_get_their_own_bytes(b: Backend) {
    for (limit, batched) in [(1000, false), (20_000, true)] {
        let (port, mut workers) = Port::builder()
            .workers(1)
            .backend(b)
            .recv_pool(65536, 16)
            .recv_pool_incremental(true)
            .single_thread_workers(batched)
            .build::<u8, u8>()
            .unwrap();
        let w = workers.pop().unwrap();
        each_limited_receive_gets_its_own_bytes(&port, w, limit);
    }
}

fn each_limited_receive_gets_its_own_bytes(port: &Port<u8, u8>, mut w: Worker<u8, u8>, limit: u32) {
    const TOTAL: usize = 4_000_000;
    let mut handles = Vec::new();
    let mut writers = Vec::new();
    for key in [0xaa_u8, 0xbb, 0xcc] {
        let (ours, mut peer) = pair();
        handles.push(port.associate(ours, key).unwrap());
        writers.push(std::thread::spawn(move || {
            let chunk = vec![key; 1000];
            for _ in 0..TOTAL / chunk.len() {
                peer.write_all(&chunk).unwrap();
            }
            peer
        }));
    }
    let limit = std::num::NonZeroU32::new(limit).unwrap();
    for h in &handles {
        w.submit_multishot(Op::recv_pooled_max(h, limit), 0);
    }
    let mut got = [0usize; 3];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.iter().any(|&g| g < TOTAL) {
        assert!(std::time::Instant::now() < deadline, "received {got:?}");
        let c = next(&mut w);
        let h = c.handle.clone().expect("a socket's completion");
        let n = match &c.result {
            // The pool ran dry for a moment: post again.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                w.submit_multishot(Op::recv_pooled_max(&h, limit), 0);
                continue;
            }
            r => *r.as_ref().unwrap(),
        };
        assert!(n > 0, "the peers do not close");
        let key = *h.key();
        let buf = c.pooled.expect("data comes in a pool buffer");
        if let Some(at) = buf.iter().position(|&x| x != key) {
            panic!(
                "a completion for socket {key:#x} holds {:#x} at {at} of {n}",
                buf[at]
            );
        }
        let i = handles.iter().position(|x| Handle::ptr_eq(x, &h)).unwrap();
        got[i] += n;
        if !c.more && got[i] < TOTAL {
            w.submit_multishot(Op::recv_pooled_max(&h, limit), 0);
        }
    }
    for wr in writers {
        wr.join().unwrap();
    }
}

/// A pooled receive with a byte limit ends, with data, once it has delivered that much (at
/// most one pool buffer more), however much the peer has sent; the rest waits in the socket for
/// the next receive, in order.
fn pooled_receive_with_a_limit_ends_there_and_the_rest_waits(b: Backend) {
    const TOTAL: usize = 200_000;
    const LIMIT: u32 = 10_000;
    const BUFFER: usize = 4096;
    let (port, mut w) = pooled_worker_with(b, BUFFER, 16, true);
    if b == Backend::Uring && kernel_version() >= (6, 17) {
        assert!(w.recv_limits(), "Linux 6.17 and later take the limit");
    }
    if !w.recv_limits() {
        println!("SKIPPED: this kernel's receives take no byte limit (Linux 6.17)");
        return;
    }
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        peer.write_all(&data).unwrap();
        peer
    });
    // Checks a completion's data against the stream; whether the receive is still armed.
    let check = |c: Completion<u8, u8>, got: &mut usize| -> bool {
        let n = c.result.unwrap();
        assert!(n > 0, "the peer does not close");
        let buf = c.pooled.expect("data comes in a pool buffer");
        assert_stream_at(&buf, *got);
        *got += n;
        c.more
    };
    let mut got = 0usize;
    let limit = std::num::NonZeroU32::new(LIMIT).unwrap();
    w.submit_multishot(Op::recv_pooled_max(&h, limit), 0);
    while check(next(&mut w), &mut got) {}
    assert!(got >= LIMIT as usize, "ended after {got} bytes");
    assert!(
        got < LIMIT as usize + BUFFER,
        "{got} bytes for a limit of {LIMIT}"
    );
    // Post again (here without a limit): the rest arrives whole and in order.
    while got < TOTAL {
        w.submit_multishot(Op::recv_pooled(&h), 1);
        loop {
            let c = next(&mut w);
            if c.result
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::ENOBUFS))
            {
                // The small pool ran dry before these completions were taken: post again.
                break;
            }
            if !check(c, &mut got) || got == TOTAL {
                break;
            }
        }
    }
    assert_eq!(got, TOTAL);
    let _peer = writer.join().unwrap();
}

/// Closing a socket whose pooled receive is armed (and has already delivered data) ends the
/// receive, and the pool gets every buffer back once the data is dropped.
fn closing_a_socket_with_a_pooled_receive_armed_gives_every_buffer_back(b: Backend) {
    let (port, mut w) = pooled_worker_with(b, 4096, 4, true);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 1);
    peer.write_all(b"some input").unwrap();
    let c = next(&mut w);
    assert_eq!(c.pooled.as_deref(), Some(&b"some input"[..]));
    assert!(c.more);
    drop(c);
    w.submit(Op::close(&h), 2);
    drop(h);
    let mut ended = false;
    let mut closed = false;
    while !(ended && closed) {
        let c = next(&mut w);
        match c.data {
            1 => {
                assert!(!c.more && c.is_cancelled(), "{:?}", c.result);
                ended = true;
            }
            _ => {
                assert_eq!(c.kind, OpKind::Close);
                closed = true;
            }
        }
    }
    assert_eq!(w.pool_available(), 4);
    // The port let go of the socket: the peer sees the end of the stream.
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

fn gathering_send_sends_pool_buffers_in_order_and_gives_them_back(b: Backend) {
    let (port, mut w) = pooled_worker(b, 8, 8);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    // Four receives, each filling its own pool buffer (8 bytes each).
    let mut bufs = Vec::new();
    for chunk in [&b"01234567"[..], b"89abcdef", b"ghijklmn", b"opqrstuv"] {
        peer.write_all(chunk).unwrap();
        let c = next(&mut w);
        bufs.push(c.pooled.expect("a pool buffer"));
    }
    assert_eq!(w.pool_available(), 4);
    // One gathering send of all four, starting 3 bytes into the first.
    w.submit(Op::send_pooled_gather(&h, bufs, 3), 7);
    let c = next(&mut w);
    assert_eq!(c.kind, OpKind::Send);
    assert_eq!(c.data, 7);
    assert_eq!(c.result.as_ref().unwrap(), &(5 + 8 + 8 + 8));
    assert!(c.pooled.is_none());
    let back: Vec<&[u8]> = c.gathered.iter().map(|b| &b[..]).collect();
    assert_eq!(
        back,
        [&b"01234567"[..], b"89abcdef", b"ghijklmn", b"opqrstuv"],
        "the buffers come back in order"
    );
    let mut echoed = [0u8; 29];
    peer.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"3456789abcdefghijklmnopqrstuv");
    drop(c);
    assert_eq!(
        w.pool_available(),
        8,
        "dropping them returns them to the pool"
    );

    // One buffer, and an offset at its end: a plain send of nothing.
    peer.write_all(b"wxyz0123").unwrap();
    let one = next(&mut w).pooled.unwrap();
    w.submit(Op::send_pooled_gather(&h, vec![one], 8), 8);
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), 0);
    assert_eq!(c.gathered.len(), 1);
}

fn pooled_receive_rearmed_after_data_and_close_sees_both(b: Backend) {
    let (port, mut w) = pooled_worker(b, 64, 8);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    // Armed, a first message, then disarmed.
    let id = w.submit_multishot(Op::recv_pooled(&h), 0);
    peer.write_all(b"first").unwrap();
    assert_eq!(next(&mut w).pooled.as_deref(), Some(&b"first"[..]));
    w.cancel(id);
    let c = next(&mut w);
    assert!(c.is_cancelled() && !c.more, "{:?}", c.result);
    // While nothing is armed, the peer sends a short message and closes: both signals pass
    // before the receive is posted again, and both must still be seen.
    peer.write_all(b"second").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_readable(&h, 6);
    // The worker waits meanwhile (taking, with epoll, the readiness those signals raised).
    assert!(matches!(
        w.dequeue(Some(Duration::from_millis(50))),
        Err(WaitError::TimedOut)
    ));
    w.submit_multishot(Op::recv_pooled(&h), 1);
    let c = next(&mut w);
    assert_eq!(c.pooled.as_deref(), Some(&b"second"[..]));
    assert!(c.more);
    let c = next(&mut w);
    assert_eq!(c.result.unwrap(), 0, "the close is reported");
    assert!(!c.more);
}

fn pooled_receive_without_a_pool_is_refused(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 0);
    let c = next(&mut w);
    assert_eq!(
        c.result.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
}

fn pooled_receive_posted_as_single_shot_is_refused(b: Backend) {
    let (port, mut w) = pooled_worker(b, 64, 8);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, 0).unwrap();
    w.submit(Op::recv_pooled(&h), 0);
    let c = next(&mut w);
    assert_eq!(
        c.result.unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    // Nothing was taken from the socket.
    peer.write_all(b"kept").unwrap();
    w.submit_multishot(Op::recv_pooled(&h), 1);
    assert_eq!(next(&mut w).pooled.as_deref(), Some(&b"kept"[..]));
}

/// Many operations forwarded at once overflow a tiny submission queue while the worker takes
/// them; the wake-up for work queued meanwhile must not be lost.
fn wake_ups_are_not_lost_when_the_submission_queue_fills(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .entries(8)
        .backend(b)
        .build::<(), u64>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || loop {
        match w.dequeue(None) {
            Ok(c) if c.kind == OpKind::Packet => tx.send(c.data).unwrap(),
            Ok(_) => {}
            Err(_) => break,
        }
    });
    // Timers that stay in flight keep the small submission queue busy.
    for round in 0..2000u64 {
        for _ in 0..20 {
            port.submit(Op::timeout(Duration::from_secs(3600)), 0)
                .unwrap();
        }
        port.post(0, Packet::new(round)).unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("round {round}: the posted packet was never dequeued"));
        assert_eq!(got, round);
    }
    port.shutdown();
    worker.join().unwrap();
}

fn a_worker_moves_to_another_thread_after_use(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    let t = std::thread::spawn(move || {
        let c = w
            .dequeue(WAIT)
            .expect("the receive completes on the new thread");
        (c.buf.unwrap(), w)
    });
    peer.write_all(b"moved").unwrap();
    let (buf, w) = t.join().unwrap();
    assert_eq!(buf, b"moved");
    drop(w);
}

/// A worker whose operations were started by a thread that has since exited still completes
/// them with their own results, not `ECANCELED`: a receive (on a socket whose operations were
/// all cancelled once before), a pooled multishot receive, a multishot accept and a send
/// waiting for room.
fn a_worker_outlives_the_thread_that_started_its_operations(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .recv_pool(4096, 16)
        .build::<u8, u8>()
        .unwrap();
    let w = workers.pop().unwrap();
    let (ours, mut peer) = pair();
    let (pooled, mut pooled_peer) = pair();
    let (full, full_peer) = pair();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = port.associate(ours, 0).unwrap();
    let p = port.associate(pooled, 1).unwrap();
    let f = port.associate(full, 2).unwrap();
    let l = port.associate(listener, 3).unwrap();
    // Fill the socket's send buffer, so that the send below waits for room.
    let filler = TcpStream::from(f.as_fd().try_clone_to_owned().unwrap());
    filler.set_nonblocking(true).unwrap();
    let stuffed = fill_for_good(&filler, 7);
    drop(filler);
    // A cancel of everything on a socket before its operations were posted concerns none of
    // them.
    let mut w = w;
    w.cancel_all(&h);
    let mut w = std::thread::spawn(move || {
        let mut w = w;
        w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
        w.submit_multishot(Op::recv_pooled(&p), 2);
        w.submit_multishot(Op::accept_multishot(&l), 3);
        w.submit(Op::send(&f, b"after".to_vec(), 0), 4);
        w.submit(Op::timeout(Duration::from_millis(300)), 5);
        assert!(matches!(
            w.dequeue(Some(Duration::ZERO)),
            Err(WaitError::TimedOut)
        ));
        w
    })
    .join()
    .unwrap();
    peer.write_all(b"moved").unwrap();
    pooled_peer.write_all(b"pooled").unwrap();
    let _client = TcpStream::connect(addr).unwrap();
    let drainer = std::thread::spawn(move || {
        let mut full_peer = full_peer;
        let mut got = vec![0u8; stuffed + 5];
        full_peer.read_exact(&mut got).unwrap();
        got[stuffed..].to_vec()
    });
    let mut seen = [false; 5];
    while seen.iter().any(|s| !s) {
        let c = next(&mut w);
        let i = c.data as usize - 1;
        assert!(
            !seen[i],
            "a second completion for operation {}: {c:?}",
            i + 1
        );
        seen[i] = true;
        match c.data {
            1 => {
                assert_eq!(c.result.as_ref().ok(), Some(&5), "the receive: {c:?}");
                assert_eq!(c.buf.unwrap(), b"moved");
            }
            2 => assert_eq!(&c.pooled.expect("pooled data")[..], b"pooled"),
            3 => assert!(c.accepted.is_some(), "{c:?}"),
            4 => assert_eq!(c.result.as_ref().ok(), Some(&5), "the send: {c:?}"),
            _ => assert_eq!(c.result.as_ref().ok(), Some(&0), "the timeout: {c:?}"),
        }
    }
    assert_eq!(drainer.join().unwrap(), b"after");
}

/// Sends waiting for room, each posted from a thread that then exits, to a peer that has shut
/// its side: each completes whole, every time. (On io_uring such a send may be running in one
/// of the kernel's own threads when its submitter exits; interrupted there, it is started
/// again from where it got to, as a cancelled one is, not ended with `EINTR` or a short
/// count.) Bounded by a count of sends and by time.
fn sends_outlive_the_threads_that_post_them(b: Backend) {
    let (port, mut w) = one_worker::<(), usize>(b);
    let (ours, mut peer) = pair();
    socket2::SockRef::from(&ours)
        .set_send_buffer_size(16 << 10)
        .unwrap();
    let h = port.associate(ours, ()).unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let reader = std::thread::spawn(move || {
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = peer.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let (mut sent, mut whole, mut in_flight) = (0u64, 0u32, false);
    let start = std::time::Instant::now();
    let mut len = 1usize;
    // (On epoll nothing runs in a kernel thread: a short run there.)
    let run_for = Duration::from_secs(if b == Backend::Uring { 6 } else { 1 });
    while whole < 50_000 && start.elapsed() < run_for {
        len = (len * 7919 + 12_345) % 60_000 + 1;
        let h = h.clone();
        let post = !in_flight;
        // Each turn on a thread of its own, which then exits.
        let (back, done) = std::thread::spawn(move || {
            if post {
                w.submit(Op::send(&h, vec![7u8; len], 0), len);
            }
            let c = w.dequeue(Some(Duration::from_millis(1))).ok();
            (w, c)
        })
        .join()
        .unwrap();
        w = back;
        in_flight = true;
        if let Some(c) = done {
            in_flight = false;
            let asked = c.data;
            assert_eq!(
                c.result.map_err(|e| e.raw_os_error()),
                Ok(asked),
                "{b}: send {} of {asked} bytes",
                whole + 1
            );
            sent += asked as u64;
            whole += 1;
        }
    }
    // The one still in flight, if any, on this thread.
    if in_flight {
        let c = next(&mut w);
        assert_eq!(
            c.result.map_err(|e| e.raw_os_error()),
            Ok(c.data),
            "{b}: the last"
        );
        sent += c.data as u64;
    }
    drop(h);
    drop(w);
    assert_eq!(reader.join().unwrap(), sent, "{b}: bytes the peer read");
}

/// On a worker only one thread has used, cancelling every operation of one handle of a socket
/// reaches, on io_uring, those of another handle of it from a duplicated descriptor (the kernel
/// matches the socket), as documented: that receive completes cancelled, and is not taken
/// for one the kernel cancelled on its own and started again.
fn cancelling_one_handle_of_a_duplicated_socket_on_one_thread(b: Backend) {
    let (port, mut w) = one_worker::<u8, u8>(b);
    let (ours, _peer) = pair();
    let dup = ours.try_clone().unwrap();
    let first = port.associate(ours, 1).unwrap();
    let second = port.associate(dup, 2).unwrap();
    let recv = w.submit(Op::recv(&second, Vec::with_capacity(8)), 2);
    assert!(matches!(
        w.dequeue(Some(Duration::ZERO)),
        Err(WaitError::TimedOut)
    ));
    w.cancel_all(&first);
    match w.dequeue(Some(Duration::from_millis(500))) {
        Ok(c) => {
            assert_eq!(b, Backend::Uring, "epoll cancels by handle: {c:?}");
            assert_eq!(c.id, recv);
            assert!(c.is_cancelled(), "{c:?}");
        }
        Err(WaitError::TimedOut) => assert_eq!(b, Backend::Epoll, "the receive never ended"),
        Err(e) => panic!("dequeue: {e}"),
    }
}

/// With `single_thread_workers`, a worker serves from the thread that first waits on it (what
/// was posted before it moved there included): pooled multishot receives, sends and packets
/// from other threads all work there. Waiting from
/// another thread afterwards fails with an error (io_uring: `EEXIST`), never a panic.
fn single_thread_workers_serve_from_their_own_thread(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .single_thread_workers(true)
        .recv_pool(4096, 16)
        .build::<(), u8>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    let (ours, mut peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    // Posted before the worker moves to its thread: that does not tie it to this one.
    w.submit_multishot(Op::recv_pooled(&h), 1);
    let t = std::thread::spawn(move || {
        let mut echoed = 0;
        let mut packet = false;
        while echoed < 2 || !packet {
            let c = w
                .dequeue(WAIT)
                .expect("a completion on the worker's thread");
            match c.data {
                1 => {
                    let buf = c.pooled.expect("data");
                    w.submit(Op::send_pooled(&h, buf, 0), 2);
                }
                2 => echoed += 1,
                // The packet from the main thread.
                3 => {
                    assert_eq!(c.kind, OpKind::Packet);
                    packet = true;
                }
                other => panic!("unexpected completion {other}: {c:?}"),
            }
        }
        w
    });
    peer.write_all(b"first").unwrap();
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first");
    port.post(0, Packet::new(3)).unwrap();
    peer.write_all(b"again").unwrap();
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
    let mut w = t.join().unwrap();
    // Used by another thread now: a wait is an error where the worker is tied to its thread
    // (io_uring on Linux 6.1+), not a panic; epoll has no such tie.
    assert_eq!(
        w.single_thread(),
        b == Backend::Uring && kernel_at_least(6, 1)
    );
    match w.dequeue(Some(Duration::from_millis(50))) {
        Err(WaitError::Io(e)) => {
            assert!(w.single_thread(), "{e}");
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        }
        Err(WaitError::TimedOut) => assert!(!w.single_thread()),
        other => panic!("{other:?}"),
    }
}

/// A subscriber that panics on every warning or error: a user's tracing layer that does so is
/// user code running inside the worker's drop.
struct PanicOnWarning;

impl tracing::Subscriber for PanicOnWarning {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        panic!("a {} event", e.metadata().level());
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Per-I/O data that says when it is dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A worker dropped where it cannot wait for its operations (a single-issuer ring on another
/// thread) logs a warning; a subscriber that panics there must not unwind through the drop of
/// the operations the kernel still holds: their buffers (and per-I/O data) are leaked, and the
/// panic reaches the caller. Where the worker can wait (epoll), the receive is cancelled and
/// its data dropped as usual, with nothing logged.
fn a_panic_while_a_worker_is_dropped_leaks_what_the_kernel_may_still_write(b: Backend) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(b)
        .single_thread_workers(true)
        .build::<(), DropFlag>()
        .unwrap();
    let mut w = workers.pop().unwrap();
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    w.submit(
        Op::recv(&h, Vec::with_capacity(64)),
        DropFlag(Arc::clone(&dropped)),
    );
    // Tied to another thread by its first wait.
    let w = std::thread::spawn(move || {
        assert!(matches!(
            w.dequeue(Some(Duration::ZERO)),
            Err(WaitError::TimedOut)
        ));
        w
    })
    .join()
    .unwrap();
    let tied = w.single_thread();
    let outcome = tracing::subscriber::with_default(PanicOnWarning, || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(w)))
    });
    if tied {
        assert!(outcome.is_err(), "the warning's panic reaches the caller");
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the receive the kernel still holds was freed"
        );
    } else {
        assert!(outcome.is_ok());
        assert!(
            dropped.load(Ordering::SeqCst),
            "a cancelled receive's data is dropped"
        );
    }
}

/// An operation posted from another thread waits in its home worker's queue until that worker
/// next turns; cancelling on the home worker in the meantime cancels it too, by id or by
/// socket, rather than letting it start afterwards and wait for ever.
fn cancelling_on_the_home_worker_reaches_operations_still_in_its_queue(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    let (ours, _peer) = pair();
    let h = port.associate(ours, ()).unwrap();
    // A receive posted from another thread: it waits in the worker's queue.
    let post_elsewhere = |data| {
        std::thread::scope(|s| {
            s.spawn(|| {
                port.submit(Op::recv(&h, Vec::with_capacity(16)), data)
                    .unwrap()
            })
            .join()
            .unwrap()
        })
    };
    let by_id = post_elsewhere(1);
    w.cancel(by_id);
    let c = next(&mut w);
    assert_eq!(
        (c.id, c.result.unwrap_err().raw_os_error()),
        (by_id, Some(libc::ECANCELED))
    );
    let by_socket = post_elsewhere(2);
    w.cancel_all(&h);
    let c = next(&mut w);
    assert_eq!(
        (c.id, c.result.unwrap_err().raw_os_error()),
        (by_socket, Some(libc::ECANCELED))
    );
}

fn huge_timeouts_wait_instead_of_panicking(b: Backend) {
    let (port, mut w) = one_worker::<(), u8>(b);
    w.submit(Op::timeout(Duration::MAX), 1);
    port.post(0, Packet::new(2)).unwrap();
    let c = w.dequeue(Some(Duration::MAX)).unwrap();
    assert_eq!(c.data, 2);
    // The timeout is still waiting: it did not complete at once (with an error, say).
    match w.dequeue(Some(Duration::from_millis(200))) {
        Err(WaitError::TimedOut) => {}
        other => panic!("the huge timeout completed: {other:?}"),
    }
}

/// Building and dropping a port leaves the thread that did so alone: its next blocking calls
/// with a timeout time out, rather than fail with `EINTR` (the kernel interrupts the threads it
/// counts as a ring's users when the ring is torn down, the one that created it among them).
fn dropping_a_port_leaves_the_dropping_thread_uninterrupted(b: Backend) {
    let built = Port::builder()
        .workers(2)
        .backend(b)
        .recv_pool(4096, 4)
        .build::<(), ()>()
        .unwrap();
    drop(built);
    uring_check::assert_timed_reads_time_out("the port was dropped");
}

#[test]
fn oversized_receive_pools_are_refused() {
    let err = Port::builder()
        .workers(1)
        .recv_pool(64, 40000)
        .build::<(), ()>()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
}
