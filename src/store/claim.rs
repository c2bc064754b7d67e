//! Which block a joining host claims, and whether it may keep one.
//!
//! A host without a configured `subnet` walks the overlay's blocks in an
//! order seeded by its name (so hosts joining at once start far apart and
//! rarely collide), skipping blocks known to be owned. The claim itself is
//! one etcd transaction (block key create-revision 0); a lost race adds the
//! block to the known owners and plans again, at most `MAX_CLAIM_ATTEMPTS`
//! times. Must never: hand out a block the view says another host owns, or
//! let a host keep a block etcd does not name it the owner of.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::layout::BlockRecord;
use crate::keys::PublicKey;

/// Claim transactions a joining host tries before giving up: each lost
/// race means another host took that block at the same moment.
pub const MAX_CLAIM_ATTEMPTS: usize = 16;

/// What a joining host does about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// etcd already names this host (name and key) the owner.
    Keep(Ipv4Net),
    /// Try to create this block's key.
    Claim(Ipv4Net),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "block {block} is owned by host {owner:?}; pick another subnet or run `meshctl decommission {owner}`"
    )]
    OwnedByOther { block: Ipv4Net, owner: String },
    #[error(
        "this host already owns block {owned}; to move it to {requested}, run `meshctl decommission {name}` first"
    )]
    OwnsAnother {
        name: String,
        owned: Ipv4Net,
        requested: Ipv4Net,
    },
    #[error(
        "block {block} is registered to host name {name:?} with another public key; a new key needs `meshctl decommission {name}` first"
    )]
    NameHasOtherKey { name: String, block: Ipv4Net },
    #[error(
        "subnet {requested} does not fit the cluster: blocks are /{block_prefix} inside {overlay}"
    )]
    WrongShape {
        requested: Ipv4Net,
        overlay: Ipv4Net,
        block_prefix: u8,
    },
    #[error("no free /{block_prefix} block left in {overlay}")]
    Full { overlay: Ipv4Net, block_prefix: u8 },
    #[error("gave up after {0} claim attempts lost to other hosts")]
    TooManyRaces(usize),
}

/// The cluster's block grid: every /`block_prefix` inside `overlay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub overlay: Ipv4Net,
    pub block_prefix: u8,
}

impl Grid {
    /// How many blocks the overlay holds (the config checks the prefix
    /// lies between the overlay's and /30, so this fits a u32 and is > 0).
    pub fn len(&self) -> u32 {
        let bits = u32::from(self.block_prefix.saturating_sub(self.overlay.prefix_len()));
        1u32.checked_shl(bits).unwrap_or(u32::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn nth(&self, i: u32) -> Ipv4Net {
        let size = 1u32
            .checked_shl(32 - u32::from(self.block_prefix))
            .unwrap_or(0);
        let base = u32::from(self.overlay.network());
        let addr = Ipv4Addr::from(base.wrapping_add(i.wrapping_mul(size)));
        Ipv4Net::new(addr, self.block_prefix).unwrap_or(self.overlay)
    }

    pub fn contains(&self, block: Ipv4Net) -> bool {
        block.prefix_len() == self.block_prefix
            && self.overlay.contains(&block)
            && block.trunc() == block
    }

    /// Every block, starting at one chosen by `name`, wrapping around.
    pub fn walk_from(&self, name: &str) -> impl Iterator<Item = Ipv4Net> + '_ {
        let n = self.len();
        let start = u32::try_from(fnv1a(name.as_bytes()) % u64::from(n)).unwrap_or(0);
        (0..n).map(move |i| self.nth(start.wrapping_add(i) % n))
    }
}

/// Decides keep-or-claim from the blocks etcd lists (block -> owner).
pub fn plan(
    blocks: &BTreeMap<Ipv4Net, BlockRecord>,
    name: &str,
    key: PublicKey,
    requested: Option<Ipv4Net>,
    grid: Grid,
) -> Result<Plan, ClaimError> {
    if let Some((&owned, rec)) = blocks.iter().find(|(_, b)| b.owner == name) {
        if rec.public_key != key {
            return Err(ClaimError::NameHasOtherKey {
                name: name.to_owned(),
                block: owned,
            });
        }
        return match requested {
            Some(r) if r != owned => Err(ClaimError::OwnsAnother {
                name: name.to_owned(),
                owned,
                requested: r,
            }),
            _ => Ok(Plan::Keep(owned)),
        };
    }
    if let Some(r) = requested {
        if !grid.contains(r) {
            return Err(ClaimError::WrongShape {
                requested: r,
                overlay: grid.overlay,
                block_prefix: grid.block_prefix,
            });
        }
        return match blocks.get(&r) {
            Some(other) => Err(ClaimError::OwnedByOther {
                block: r,
                owner: other.owner.clone(),
            }),
            None => Ok(Plan::Claim(r)),
        };
    }
    grid.walk_from(name)
        .find(|b| !blocks.contains_key(b))
        .map(Plan::Claim)
        .ok_or(ClaimError::Full {
            overlay: grid.overlay,
            block_prefix: grid.block_prefix,
        })
}

/// FNV-1a: a stable seed from a name (std's hasher is randomised per
/// process, and the seed must be the same on every restart).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn grid() -> Grid {
        Grid {
            overlay: "10.42.0.0/16".parse().unwrap(),
            block_prefix: 24,
        }
    }

    fn owner(name: &str, k: u8) -> BlockRecord {
        BlockRecord {
            owner: name.into(),
            public_key: PublicKey::from([k; 32]),
        }
    }

    #[test]
    fn grid_walk_visits_every_block_once_from_a_name_seeded_start() {
        let g = grid();
        assert_eq!(g.len(), 256);
        let all: std::collections::BTreeSet<_> = g.walk_from("h1").collect();
        assert_eq!(all.len(), 256);
        assert!(all.iter().all(|b| g.contains(*b)));
        assert_eq!(g.walk_from("h1").next(), g.walk_from("h1").next());
        let starts: std::collections::BTreeSet<_> = (0..20)
            .map(|i| g.walk_from(&format!("host-{i}")).next().unwrap())
            .collect();
        assert!(starts.len() >= 15, "seeds spread: {starts:?}");
    }

    #[test]
    fn a_new_host_claims_a_free_block_skipping_owned_ones() {
        let g = grid();
        let first = g.walk_from("h1").next().unwrap();
        let mut blocks = BTreeMap::new();
        assert_eq!(
            plan(&blocks, "h1", PublicKey::from([1; 32]), None, g),
            Ok(Plan::Claim(first))
        );
        blocks.insert(first, owner("h9", 9));
        let Ok(Plan::Claim(next)) = plan(&blocks, "h1", PublicKey::from([1; 32]), None, g) else {
            panic!("expected a claim");
        };
        assert_ne!(next, first);
    }

    #[test]
    fn a_host_keeps_its_block_only_if_etcd_names_it_with_its_key() {
        let g = grid();
        let b: Ipv4Net = "10.42.7.0/24".parse().unwrap();
        let blocks = BTreeMap::from([(b, owner("h1", 1))]);
        let k1 = PublicKey::from([1; 32]);
        assert_eq!(plan(&blocks, "h1", k1, None, g), Ok(Plan::Keep(b)));
        assert_eq!(plan(&blocks, "h1", k1, Some(b), g), Ok(Plan::Keep(b)));
        let other: Ipv4Net = "10.42.8.0/24".parse().unwrap();
        assert!(matches!(
            plan(&blocks, "h1", k1, Some(other), g),
            Err(ClaimError::OwnsAnother { .. })
        ));
        assert!(matches!(
            plan(&blocks, "h1", PublicKey::from([2; 32]), None, g),
            Err(ClaimError::NameHasOtherKey { .. })
        ));
    }

    #[test]
    fn a_requested_subnet_is_claimed_if_free_and_refused_if_owned_or_misshapen() {
        let g = grid();
        let b: Ipv4Net = "10.42.7.0/24".parse().unwrap();
        let k = PublicKey::from([3; 32]);
        assert_eq!(
            plan(&BTreeMap::new(), "h3", k, Some(b), g),
            Ok(Plan::Claim(b))
        );
        let blocks = BTreeMap::from([(b, owner("h1", 1))]);
        let err = plan(&blocks, "h3", k, Some(b), g).unwrap_err();
        assert!(err.to_string().contains("owned by host \"h1\""), "{err}");
        for bad in ["10.42.7.0/25", "10.43.0.0/24"] {
            let err = plan(&BTreeMap::new(), "h3", k, Some(bad.parse().unwrap()), g);
            assert!(matches!(err, Err(ClaimError::WrongShape { .. })), "{bad}");
        }
    }

    #[test]
    fn a_full_overlay_is_an_error_not_a_loop() {
        let g = Grid {
            overlay: "10.42.0.0/23".parse().unwrap(),
            block_prefix: 24,
        };
        let blocks: BTreeMap<_, _> = g.walk_from("x").map(|b| (b, owner("o", 9))).collect();
        assert_eq!(blocks.len(), 2);
        assert!(matches!(
            plan(&blocks, "h1", PublicKey::from([1; 32]), None, g),
            Err(ClaimError::Full { .. })
        ));
    }
}
