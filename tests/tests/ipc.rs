//! Message passing on the real kernel: streamed transfers, FIFO order, full
//! mailboxes, dead peers, argument errors, blocking receives and deadlock.

use superos_protocol::event::FaultKind;
use superos_tests::*;
use superos_vmm::run::ProcessStatus;

/// The value after `checksum ` in a line.
fn checksum(line: &str) -> &str {
    let start = line.find("checksum ").expect("a checksum") + "checksum ".len();
    line[start..].split([',', ' ']).next().unwrap()
}

#[test]
fn a_streamed_transfer_arrives_complete_and_in_order() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("ipc-stream");
    assert_success(&report);
    assert_eq!(pid_of(&report, "receiver"), 1);
    assert_eq!(pid_of(&report, "sender"), 2);
    let received = report.output_of("receiver");
    let sent = report.output_of("sender");
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert!(
        received[0].starts_with("ipc: stream-recv: received 262144 bytes in 64 messages from pid 2, "),
        "{received:#?}"
    );
    assert!(received[0].contains(", 0 bad bytes, "), "{received:#?}");
    assert!(received[0].ends_with(" KiB/s"), "{received:#?}");
    assert!(
        sent[0].starts_with("ipc: stream-send: sent 262144 bytes in 64 messages to pid 1, "),
        "{sent:#?}"
    );
    assert_eq!(checksum(received[0]), checksum(sent[0]));
    assert_no_frame_lost(&report);
}

#[test]
fn each_senders_messages_arrive_in_fifo_order() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(process_toml("receiver", "ipc", "mode=order-recv n=40 senders=2", "")
            + &process_toml("sender-a", "ipc", "mode=order peer=1 n=40", "")
            + &process_toml("sender-b", "ipc", "mode=order peer=1 n=40", "")),
    );
    assert_success(&report);
    assert_eq!(
        report.output_of("receiver"),
        vec!["ipc: order-recv: 40 messages from each of 2 senders, all in order"]
    );
    for sender in ["sender-a", "sender-b"] {
        assert_eq!(report.output_of(sender), vec!["ipc: order: sent 40 messages to pid 1"]);
    }
}

#[test]
fn one_sender_takes_at_most_half_a_mailbox_and_another_still_gets_through() {
    if !kvm_available() {
        return;
    }
    // pid 1 never receives and lives until both senders are gone; its
    // queued messages are discarded when it exits. The mailbox rule: each
    // flooder gets MAILBOX_PER_SENDER (4) of the 8 slots, whoever floods
    // first, so the second sender's messages get through the first one's
    // flood.
    let report = run_text(
        &(process_toml("deaf", "quota-hog", "mode=outlive pid=2 and=3", "")
            + &process_toml("flood", "ipc", "mode=flood peer=1", "")
            + &process_toml("partner", "ipc", "mode=flood peer=1", "")),
    );
    assert_success(&report);
    for sender in ["flood", "partner"] {
        assert_eq!(
            report.output_of(sender),
            vec!["ipc: flood: pid 1 accepted 4 messages, then: mailbox-full"],
            "{sender}"
        );
    }
    assert_eq!(status_of(&report, "deaf"), ProcessStatus::Exited(0));
    assert_no_frame_lost(&report);
}

#[test]
fn sending_to_a_process_that_exited_is_no_such_process() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(process_toml("short-lived", "exit-code", "0", "expect = { exit = 0 }")
            + &process_toml("sender", "ipc", "mode=dead-peer peer=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "sender", 3);
}

#[test]
fn bad_ipc_arguments_are_error_returns_not_faults() {
    if !kvm_available() {
        return;
    }
    let report = run_text(&process_toml("bad-args", "ipc", "mode=bad-args", ""));
    assert_success(&report);
    assert_checks_pass(&report, "bad-args", 30);
    let output = report.output_of("bad-args");
    for needle in [
        "ipc: bad-args: send of MESSAGE_MAX + 1 bytes: Err(TooLarge) (as expected)",
        "ipc: bad-args: recv into 10 bytes: Err(BufferTooSmall) (as expected)",
        "ipc: bad-args: try_recv on an empty mailbox: Err(WouldBlock) (as expected)",
        "ipc: bad-args: one more: Err(MailboxFull) (as expected)",
    ] {
        assert!(output.contains(&needle), "missing {needle:?}: {output:#?}");
    }
    assert_no_frame_lost(&report);
}

#[test]
fn a_ping_pong_measures_the_round_trip() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("ipc-pingpong");
    assert_success(&report);
    assert_eq!(report.output_of("pong"), vec!["ipc: pong: echoed 200 messages"]);
    let ping = report.output_of("ping");
    assert_eq!(ping.len(), 1, "{ping:#?}");
    assert!(ping[0].starts_with("ipc: pingpong: 200 round trips of 64 bytes with pid 1: "), "{ping:#?}");
    assert!(ping[0].ends_with(" ns each"), "{ping:#?}");
}

#[test]
fn a_blocked_receiver_wakes_when_a_message_arrives() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(process_toml("waiter", "ipc", "mode=wait", "")
            + &process_toml("sender", "ipc", "mode=order peer=1 n=1", "")),
    );
    assert_success(&report);
    assert_eq!(
        report.output_of("waiter"),
        vec!["ipc: wait: waiting for a message", "ipc: wait: got 4 bytes from pid 2"]
    );
}

#[test]
fn receivers_nobody_can_ever_wake_are_terminated_as_deadlocked() {
    if !kvm_available() {
        return;
    }
    let expect = "expect = { fault = \"deadlock\" }";
    // Alone after the only other process exited.
    let report = run_text(
        &(process_toml("bystander", "hello", "spin=1", "")
            + &process_toml("waiter", "ipc", "mode=wait", expect)),
    );
    assert_clean_shutdown(&report);
    assert_eq!(fault_of(&report, "waiter"), Some(FaultKind::Deadlock), "{report:#?}");
    assert_eq!(status_of(&report, "bystander"), ProcessStatus::Exited(0));
    assert_success(&report);
    assert_no_frame_lost(&report);
    // Two processes waiting for each other.
    let report = run_text(
        &(process_toml("a", "ipc", "mode=wait", expect) + &process_toml("b", "ipc", "mode=wait", expect)),
    );
    assert_clean_shutdown(&report);
    assert_eq!(fault_of(&report, "a"), Some(FaultKind::Deadlock), "{report:#?}");
    assert_eq!(fault_of(&report, "b"), Some(FaultKind::Deadlock), "{report:#?}");
    assert_no_frame_lost(&report);
}
