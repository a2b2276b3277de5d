"""MIG's drivers for its grids: closed after each use, or kept for a command's whole run."""

import threading

import pytest

from migrations_app import config
from migrations_app.grids import AppNotFound

pytestmark = pytest.mark.django_db


def connected(driver):
    """Whether the driver's SSH connection is open (SSHTransport keeps one client)."""
    client = driver.transport._client
    return client is not None and client.get_transport().is_active()


def test_a_driver_is_closed_after_its_block(grids):
    with config.driver_for(config.grid_config("west")) as driver:
        driver.info()
        assert connected(driver)
    assert not connected(driver)


def test_kept_drivers_serve_one_block_after_another_on_one_connection(grids):
    west = config.grid_config("west")
    with config.keeping_drivers():
        with config.driver_for(west) as first:
            first.info()
        assert connected(first)
        with config.driver_for(west) as second:
            assert second is first
            assert second.info().name == "west"
        with config.driver_for(config.grid_config("east")) as east:
            assert east is not first
    assert not connected(first) and not connected(east)


def test_a_kept_driver_serves_one_block_at_a_time(grids):
    west = config.grid_config("west")
    seen = []
    with config.keeping_drivers():
        with config.driver_for(west) as outer:
            with config.driver_for(west) as inner:
                assert inner is not outer

            def use():
                with config.driver_for(west) as driver:
                    seen.append(driver)

            # Pre-flight checks its grids in threads: a driver put back serves any of them.
            thread = threading.Thread(target=use)
            thread.start()
            thread.join()
            assert seen == [inner]
        with config.driver_for(west) as again:
            assert again in (outer, inner)


def test_a_driver_whose_block_failed_is_not_kept(grids):
    west = config.grid_config("west")
    with config.keeping_drivers():
        with pytest.raises(AppNotFound):
            with config.driver_for(west) as failed:
                failed.state("no-such-app")
        assert not connected(failed)
        with config.driver_for(west) as fresh:
            assert fresh is not failed
            assert fresh.info().name == "west"
