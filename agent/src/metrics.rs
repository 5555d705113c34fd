//! The agent's metrics: tasks it ran by outcome, tasks running now, its stream to the
//! gateway. Every series carries `component="agent"`; `pm-agent --metrics-listen` (or
//! `pm dev --metrics-listen`) serves them. The handles are made on first use, after the
//! recorder is installed at start.

use std::sync::LazyLock;

use ::metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, gauge};

pub const COMPONENT: &str = "agent";

pub struct AgentMetrics {
    pub succeeded: Counter,
    pub failed: Counter,
    /// Assigns refused (an executor this agent lacks).
    pub rejected: Counter,
    /// Running tasks given back on a drain that ran out of time.
    pub handed_back: Counter,
    pub running: Gauge,
    pub connected: Gauge,
    pub reconnects: Counter,
}

pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| {
    describe_counter!(
        "pm_agent_tasks_total",
        "Tasks this agent was assigned, by outcome: succeeded, failed, rejected (it cannot run them), handed_back (a drain ran out of time)."
    );
    describe_gauge!("pm_agent_tasks_running", "Tasks running on this agent now.");
    describe_gauge!(
        "pm_agent_connected",
        "1 while the agent's stream to the gateway is open and welcomed."
    );
    describe_counter!(
        "pm_agent_reconnects_total",
        "Times the agent's stream was lost and opened again."
    );
    let outcome = |o: &'static str| counter!("pm_agent_tasks_total", "component" => COMPONENT, "outcome" => o);
    AgentMetrics {
        succeeded: outcome("succeeded"),
        failed: outcome("failed"),
        rejected: outcome("rejected"),
        handed_back: outcome("handed_back"),
        running: gauge!("pm_agent_tasks_running", "component" => COMPONENT),
        connected: gauge!("pm_agent_connected", "component" => COMPONENT),
        reconnects: counter!("pm_agent_reconnects_total", "component" => COMPONENT),
    }
});
