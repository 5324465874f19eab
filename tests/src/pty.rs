//! A pseudo-terminal the test (or benchmark) holds, with a program on its
//! other side as its controlling terminal: keys typed, output read, window
//! resized — as an operator at a terminal does.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wait_until;

/// The CLI's terminal, from the operator's side.
pub struct Terminal {
    pub master: std::fs::File,
    pub seen: Arc<Mutex<Vec<u8>>>,
    /// Output already matched by `expect` (each expectation looks past it).
    pub mark: usize,
}

impl Terminal {
    /// Starts `program ARGS` (the `baton` CLI, talking to `server`) on a new
    /// terminal of 24×80, as its controlling one.
    pub fn spawn(program: &Path, server: &str, args: &[&str]) -> (Terminal, Child) {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors we then own.
        let rc = unsafe {
            libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size as *const _ as *mut _)
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: just opened, owned here only.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(program);
        cmd.args(args).env("BATON_SERVER", server).env_remove("BATON_TOKEN");
        cmd.stdin(Stdio::from(slave.try_clone().expect("dup terminal")))
            .stdout(Stdio::from(slave.try_clone().expect("dup terminal")))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start the program on a terminal");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = std::fs::File::from(master.try_clone().expect("dup terminal"));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("terminal buffer").extend_from_slice(&buf[..n]);
            }
        });
        (Terminal { master: master.into(), seen, mark: 0 }, child)
    }

    pub fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("type");
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().expect("terminal buffer")).into_owned()
    }

    /// Waits until `what` appears after what was already matched.
    pub fn expect(&mut self, what: &str, within: Duration) {
        let found = wait_until(within, || {
            let seen = self.seen.lock().expect("terminal buffer");
            let tail = String::from_utf8_lossy(&seen[self.mark.min(seen.len())..]).into_owned();
            tail.find(what).map(|i| self.mark + i + what.len())
        });
        match found {
            Some(end) => self.mark = end,
            None => panic!("{what:?} never appeared on the terminal; it shows:\n{}", self.text()),
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize.
        assert_eq!(unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) }, 0);
    }
}
