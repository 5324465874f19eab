//! `netdelay QUEUE DELAY_MS`: holds every packet iptables queues to NFQUEUE
//! number QUEUE for DELAY_MS, then lets it go (in order). The field tests'
//! stand-in for `tc netem delay` on a kernel without netem; loss comes from
//! iptables' `statistic` match. Runs in the network namespace whose packets
//! it delays (`nsenter --net=…`). Stops when its stdin closes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(queue), Some(delay)) =
        (args.get(1).and_then(|q| q.parse().ok()), args.get(2).and_then(|d| d.parse().ok()))
    else {
        eprintln!("usage: netdelay QUEUE DELAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay);
    let mut q = nfq::Queue::open()?;
    q.bind(queue)?;
    q.set_nonblocking(true);
    // The parent closing our stdin is the signal to stop (and let held packets go).
    let (stop_tx, stop) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = stop_tx.send(());
    });
    println!("ready");
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        let stopping = stop.try_recv().is_ok();
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        while held.front().is_some_and(|(due, _)| stopping || *due <= Instant::now()) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(nfq::Verdict::Accept);
                q.verdict(msg)?;
            }
        }
        if stopping {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
