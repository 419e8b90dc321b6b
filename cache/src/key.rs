//! Entry names: `<digest>.<generation>`, and what a valid digest is.

use crate::error::Error;

pub(crate) fn valid_digest(digest: &str) -> Result<(), Error> {
    let ok = (16..=128).contains(&digest.len())
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadKey(digest.to_string()))
    }
}

/// `<digest>.<generation>` -> (digest, generation).
pub fn split_key(key: &str) -> Result<(&str, u64), Error> {
    let bad = || Error::BadKey(key.to_string());
    let (digest, gen) = key.rsplit_once('.').ok_or_else(bad)?;
    valid_digest(digest)?;
    let gen = gen
        .parse::<u64>()
        .ok()
        .filter(|g| *g > 0 && gen.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(bad)?;
    Ok((digest, gen))
}

pub(crate) fn valid_key(key: &str) -> Result<(), Error> {
    split_key(key).map(|_| ())
}

/// The entry name of generation `gen` of `digest`.
pub fn make_key(digest: &str, gen: u64) -> String {
    format!("{digest}.{gen}")
}
