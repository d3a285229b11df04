//! Sans-I/O plan of how one batch of forwarded UDP datagrams is sent: which go out together as
//! one UDP GSO send (`UDP_SEGMENT`), and which one by one.
//!
//! A GSO send hands the kernel several datagrams for the same destination in one buffer; it
//! cuts them into datagrams of `segment` bytes (the last may be shorter), so the routing,
//! IP output and (on loopback) delivery path run once per group instead of once per datagram.
//! The receiver sees ordinary datagrams, byte for byte the same.
//!
//! Rules of a group: one destination; every datagram `segment` bytes long except that the last
//! may be shorter (a shorter one closes the group); at most [`GSO_MAX_SEGMENTS`] datagrams and
//! [`GSO_MAX_BYTES`] bytes. The order of datagrams to the same destination is kept: groups are
//! listed in the order of their first datagram, and a datagram joins only the newest group of
//! its destination.
//!
//! What it does not do: syscalls, or decide whether the kernel supports GSO (the I/O layer
//! falls back to one datagram per message when a GSO send fails).

use std::net::SocketAddr;

/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (one IP packet's payload before segmentation, with headroom).
pub const GSO_MAX_BYTES: usize = 60_000;

/// A run of datagrams sent in one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Destination.
    pub to: SocketAddr,
    /// Length of every datagram but the last.
    pub segment: usize,
    /// Indices into the batch, in sending order.
    pub items: Vec<usize>,
    bytes: usize,
    closed: bool,
}

/// Groups `batch` (`(destination, length)` per forwarded datagram, in arrival order) into
/// `groups`, reusing its allocations. Groups of one datagram are sent without GSO.
pub fn plan(batch: &[(SocketAddr, usize)], groups: &mut Vec<Group>) {
    groups.clear();
    for (i, &(to, len)) in batch.iter().enumerate() {
        let newest = groups.iter_mut().rev().find(|g| g.to == to);
        match newest {
            Some(g)
                if !g.closed
                    && len <= g.segment
                    && len > 0
                    && g.items.len() < GSO_MAX_SEGMENTS
                    && g.bytes + len <= GSO_MAX_BYTES =>
            {
                g.items.push(i);
                g.bytes += len;
                g.closed = len < g.segment;
            }
            _ => groups.push(Group {
                to,
                segment: len,
                items: vec![i],
                bytes: len,
                closed: len == 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn groups_by_destination_and_size_keeping_order() {
        let mut g = Vec::new();
        let batch = [
            (a(1), 200),
            (a(2), 200),
            (a(1), 200),
            (a(1), 100), // shorter: last of its group
            (a(1), 200), // new group for a(1), after the first
            (a(2), 300), // longer than the segment: new group
            (a(2), 0),   // empty datagram: alone
        ];
        plan(&batch, &mut g);
        let got: Vec<(u16, usize, Vec<usize>)> = g
            .iter()
            .map(|g| (g.to.port(), g.segment, g.items.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 200, vec![0, 2, 3]),
                (2, 200, vec![1]),
                (1, 200, vec![4]),
                (2, 300, vec![5]),
                (2, 0, vec![6]),
            ]
        );
    }

    #[test]
    fn groups_are_bounded() {
        let mut g = Vec::new();
        plan(&vec![(a(1), 10); GSO_MAX_SEGMENTS + 1], &mut g);
        assert_eq!(
            g.iter().map(|g| g.items.len()).collect::<Vec<_>>(),
            [GSO_MAX_SEGMENTS, 1]
        );
        plan(&[(a(1), 30_000), (a(1), 30_000), (a(1), 30_000)], &mut g);
        assert_eq!(g.iter().map(|g| g.items.len()).collect::<Vec<_>>(), [2, 1]);
    }
}
