//! Budgets, accounts and credit entries in the database.

use crate::keys::now_ms;
use crate::ledger::{HOUR_MS, NONE_IN_ROLLUPS};
use crate::{Database, Error};
use serde::Serialize;
use sqlx::Row;
use std::sync::Arc;
use tollgate_core::money::{Budget, Micros, Window};

/// A prepaid account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    /// Its name.
    pub name: String,
    /// Top-ups minus settled usage, micro-USD.
    pub balance: Micros,
    /// Below this the low-balance hook fires.
    pub low_balance: Option<Micros>,
}

/// One top-up or adjustment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditEntry {
    /// Increasing id.
    pub id: i64,
    /// The account.
    pub account: String,
    /// Micro-USD; negative for a deduction.
    pub amount: Micros,
    /// Who made it.
    pub who: String,
    /// Why.
    pub why: String,
    /// Unix milliseconds.
    pub at: i64,
}

/// A marker that moves whenever a budget changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetsVersion {
    count: i64,
    last_update_ms: i64,
}

/// A hold that a crash left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleHold {
    /// The request it was for.
    pub request_id: String,
    /// The account.
    pub account: String,
    /// Micro-USD held.
    pub amount: Micros,
}

/// What a spend sum is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendColumn {
    /// Everything.
    Org,
    /// By team.
    Team,
    /// By key name.
    Key,
    /// By end user.
    User,
}

impl SpendColumn {
    /// The column and the scope prefix of a budget scope.
    pub fn of_scope(scope: &str) -> Option<(Self, Option<&str>)> {
        if scope == "org" {
            return Some((Self::Org, None));
        }
        let (kind, name) = scope.split_once(':')?;
        let column = match kind {
            "team" => Self::Team,
            "key" => Self::Key,
            "user" => Self::User,
            _ => return None,
        };
        Some((column, (name != "*").then_some(name)))
    }

    fn column(self) -> &'static str {
        match self {
            Self::Org => "'org'",
            Self::Team => "team",
            Self::Key => "key_name",
            Self::User => "end_user",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::Org => "",
            Self::Team => "team:",
            Self::Key => "key:",
            Self::User => "user:",
        }
    }
}

impl Database {
    /// Adds or replaces the budget of `budget.scope` over its window.
    pub async fn set_budget(&self, budget: &Budget) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO budgets (scope, period, cap_micros, alert_percent, updated_at)
             VALUES ($1, $2, $3, $4,
                     (SELECT CASE WHEN MAX(updated_at) >= $5 THEN MAX(updated_at) + 1 ELSE $5 END FROM budgets))
             ON CONFLICT (scope, period) DO UPDATE SET cap_micros = excluded.cap_micros,
               alert_percent = excluded.alert_percent, updated_at = excluded.updated_at",
        )
        .bind(&*budget.scope)
        .bind(budget.window.as_str())
        .bind(budget.cap)
        .bind(budget.alert_percent.map(i64::from))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a budget; false when there was none.
    pub async fn remove_budget(&self, scope: &str, window: Window) -> Result<bool, Error> {
        let done = sqlx::query("DELETE FROM budgets WHERE scope = $1 AND period = $2")
            .bind(scope)
            .bind(window.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every budget, by scope.
    pub async fn list_budgets(&self) -> Result<Vec<Budget>, Error> {
        let rows = sqlx::query(
            "SELECT scope, period, cap_micros, alert_percent FROM budgets ORDER BY scope, period",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let period: String = r.try_get("period")?;
                let alert: Option<i64> = r.try_get("alert_percent")?;
                Ok(Budget {
                    scope: Arc::from(r.try_get::<String, _>("scope")?),
                    window: period
                        .parse()
                        .map_err(|e: String| Error::Query(sqlx::Error::Decode(e.into())))?,
                    cap: r.try_get("cap_micros")?,
                    alert_percent: alert.and_then(|a| u8::try_from(a).ok()),
                })
            })
            .collect()
    }

    /// A marker that moves whenever a budget is set or removed.
    pub async fn budgets_version(&self) -> Result<BudgetsVersion, Error> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n, COALESCE(MAX(updated_at), 0) AS t FROM budgets")
                .fetch_one(&self.pool)
                .await?;
        Ok(BudgetsVersion {
            count: row.try_get("n")?,
            last_update_ms: row.try_get("t")?,
        })
    }

    /// Settled spend since `since_ms` per scope of `column`: one sum for
    /// `name`, or one per member when `name` is `None`. Scopes come back
    /// named as budgets name them (`team:search`).
    ///
    /// Every budget window starts on a UTC hour, so the org, a key and a
    /// team are summed from the hourly rollups, which the ledger writes in
    /// the same transaction as the rows: a month's spend in time that grows
    /// with hours and groups, not with the rows (seconds a budget at start
    /// with millions of rows). End users are not in the rollups, and the
    /// rollups write `-` for "no team", which a team or key of that name
    /// would be taken for: those sums read the rows.
    pub async fn spend_since(
        &self,
        column: SpendColumn,
        name: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<(String, Micros)>, Error> {
        let col = column.column();
        // A member's rows: not none, which the rollups write as `-`.
        let (table, member) = if self.rollups_answer(column, name, since_ms).await? {
            ("usage_hours", format!("{col} <> '{NONE_IN_ROLLUPS}'"))
        } else {
            ("usage", format!("{col} IS NOT NULL"))
        };
        // SUM of BIGINT is NUMERIC in PostgreSQL: cast back. PostgreSQL
        // refuses to group by a constant, and the org sums everything anyway.
        let sum = "CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS spent";
        let sql = match (column, name) {
            (SpendColumn::Org, _) => format!("SELECT {sum} FROM {table} WHERE at >= $1"),
            (_, Some(_)) => format!(
                "SELECT {col} AS scope, {sum} FROM {table} WHERE at >= $1 AND {col} = $2 GROUP BY {col}"
            ),
            (_, None) => format!(
                "SELECT {col} AS scope, {sum} FROM {table} WHERE at >= $1 AND {member} GROUP BY {col}"
            ),
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(since_ms);
        if let (Some(n), false) = (name, column == SpendColumn::Org) {
            q = q.bind(n);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let scope = match column {
                    SpendColumn::Org => "org".to_owned(),
                    c => format!("{}{}", c.prefix(), r.try_get::<String, _>("scope")?),
                };
                Ok((scope, r.try_get("spent")?))
            })
            .collect()
    }

    /// Whether the hourly rollups sum exactly what the rows would.
    async fn rollups_answer(
        &self,
        column: SpendColumn,
        name: Option<&str>,
        since_ms: i64,
    ) -> Result<bool, Error> {
        if since_ms.rem_euclid(HOUR_MS) != 0 {
            return Ok(false);
        }
        let key_column = match column {
            SpendColumn::Org => return Ok(true),
            SpendColumn::User => return Ok(false),
            SpendColumn::Key => "name",
            SpendColumn::Team => "team",
        };
        match name {
            Some(n) => Ok(n != NONE_IN_ROLLUPS),
            // All members: unless some key is named `-` (keys are never
            // deleted, nor renamed) or is in a team named `-` (which the
            // config refuses), a `-` in the rollups means none.
            None => {
                let sql = format!(
                    "SELECT COUNT(*) AS n FROM api_keys WHERE {key_column} = '{NONE_IN_ROLLUPS}'"
                );
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&self.pool)
                    .await?;
                Ok(row.try_get::<i64, _>("n")? == 0)
            }
        }
    }

    /// Adds `amount` to `account` (created on its first entry) with who
    /// and why, in one transaction with the balance.
    pub async fn add_credits(
        &self,
        account: &str,
        amount: Micros,
        who: &str,
        why: &str,
    ) -> Result<CreditEntry, Error> {
        let at = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO accounts (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(account)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query(
            "INSERT INTO credit_entries (account, amount_micros, who, why, at) VALUES ($1, $2, $3, $4, $5)
             RETURNING id",
        )
        .bind(account)
        .bind(amount)
        .bind(who)
        .bind(why)
        .bind(at)
        .fetch_one(&mut *tx)
        .await?
        .try_get("id")?;
        sqlx::query("UPDATE accounts SET balance_micros = balance_micros + $1 WHERE name = $2")
            .bind(amount)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(CreditEntry {
            id,
            account: account.to_owned(),
            amount,
            who: who.to_owned(),
            why: why.to_owned(),
            at,
        })
    }

    /// Sets the balance below which the account's low-balance hook fires.
    pub async fn set_low_balance(&self, account: &str, mark: Option<Micros>) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO accounts (name, low_balance_micros, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET low_balance_micros = excluded.low_balance_micros",
        )
        .bind(account)
        .bind(mark)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every account (or the one named), with the newest credit entry
    /// their balances include, read in one statement so the two agree.
    pub async fn accounts_snapshot(
        &self,
        only: Option<&str>,
    ) -> Result<(Vec<Account>, i64), Error> {
        let rows = sqlx::query(
            "SELECT name, balance_micros, low_balance_micros,
                    (SELECT COALESCE(MAX(id), 0) FROM credit_entries) AS last_entry
             FROM accounts WHERE $1 IS NULL OR name = $1 ORDER BY name",
        )
        .bind(only)
        .fetch_all(&self.pool)
        .await?;
        let last = match rows.first() {
            Some(r) => r.try_get("last_entry")?,
            None => self.last_credit_entry().await?,
        };
        Ok((
            rows.iter()
                .map(account_from_row)
                .collect::<Result<_, _>>()?,
            last,
        ))
    }

    /// Every account.
    pub async fn list_accounts(&self) -> Result<Vec<Account>, Error> {
        let rows = sqlx::query(
            "SELECT name, balance_micros, low_balance_micros FROM accounts ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(account_from_row).collect()
    }

    /// One account.
    pub async fn find_account(&self, name: &str) -> Result<Account, Error> {
        let row = sqlx::query(
            "SELECT name, balance_micros, low_balance_micros FROM accounts WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::AccountNotFound(name.to_owned()))?;
        account_from_row(&row)
    }

    /// Credit entries with an id above `after`, oldest first; of one
    /// account when `account` is given.
    pub async fn credit_entries(
        &self,
        account: Option<&str>,
        after: i64,
    ) -> Result<Vec<CreditEntry>, Error> {
        let rows = sqlx::query(
            "SELECT id, account, amount_micros, who, why, at FROM credit_entries
             WHERE id > $1 AND ($2 IS NULL OR account = $2) ORDER BY id",
        )
        .bind(after)
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CreditEntry {
                    id: r.try_get("id")?,
                    account: r.try_get("account")?,
                    amount: r.try_get("amount_micros")?,
                    who: r.try_get("who")?,
                    why: r.try_get("why")?,
                    at: r.try_get("at")?,
                })
            })
            .collect()
    }

    /// The newest credit entry's id (0 when none).
    pub async fn last_credit_entry(&self) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS id FROM credit_entries")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("id")?)
    }

    /// Removes and returns the holds a previous run left behind: their
    /// requests never settled, so nothing was charged for them.
    pub async fn release_stale_holds(&self) -> Result<Vec<StaleHold>, Error> {
        let rows = sqlx::query("DELETE FROM holds RETURNING request_id, account, amount_micros")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StaleHold {
                    request_id: r.try_get("request_id")?,
                    account: r.try_get("account")?,
                    amount: r.try_get("amount_micros")?,
                })
            })
            .collect()
    }
}

fn account_from_row(r: &sqlx::any::AnyRow) -> Result<Account, Error> {
    Ok(Account {
        name: r.try_get("name")?,
        balance: r.try_get("balance_micros")?,
        low_balance: r.try_get("low_balance_micros")?,
    })
}
