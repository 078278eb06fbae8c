"""The cache root's clean-up removes only chattune's own dead temporary folders, never a user's hidden ones."""

import os
import socket

from chattune.data import integrity


def test_only_old_or_orphaned_tmp_folders_are_removed(tmp_path):
    old = 1_000_000  # seconds since the epoch: far older than STALE_AFTER_S
    mine_dead = tmp_path / f".tmp-999999999-{socket.gethostname()}-abc"
    other_old = tmp_path / ".tmp-1-otherhost-abc"
    user_git, user_venv, live = tmp_path / ".git", tmp_path / ".venv", tmp_path / f".tmp-{os.getpid()}-x-abc"
    for d in (mine_dead, other_old, user_git, user_venv, live):
        d.mkdir()
    for d in (other_old, user_git, user_venv):
        os.utime(d, (old, old))
    removed = integrity.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([mine_dead.name, other_old.name])
    assert user_git.is_dir() and user_venv.is_dir() and live.is_dir()
