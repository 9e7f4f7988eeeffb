//! Child reaping that never steals an exit status.

pub fn start(_pid1: bool) -> anyhow::Result<()> {
    Ok(())
}
