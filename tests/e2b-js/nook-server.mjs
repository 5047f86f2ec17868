// Points the official, unmodified e2b SDK at a `nook serve`: the one scripts/test.sh started for all SDK suites
// (NOOK_TEST_URL and NOOK_TEST_KEY; see tests/nook_test_server.py), or else one started here for a test file, on a
// free loopback port with its own data directory. The SDK gets nothing but the three environment variables a user
// would set (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). `stop` kills every sandbox still alive through the API, then
// stops a server started here. The nook binary, the agent and the base image come from NOOK_BIN, NOOK_AGENT_BINARY
// and NOOK_BASE_IMAGE_TAR, as scripts/test.sh sets them.

import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { Sandbox } from 'e2b'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')

function requiredEnv(name) {
  const value = process.env[name]
  if (!value) {
    throw new Error(`${name} is not set: run the suite through scripts/test.sh`)
  }
  return value
}

function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolvePort(port))
    })
  })
}

async function waitForHealth(url, child, logPath) {
  const deadline = Date.now() + 120_000
  for (;;) {
    try {
      const response = await fetch(`${url}/v1/health`, { signal: AbortSignal.timeout(1000) })
      if (response.ok) return
    } catch {
      // not listening yet
    }
    if (child.exitCode !== null || Date.now() > deadline) {
      throw new Error(`nook serve did not start:\n${readFileSync(logPath, 'utf8').slice(-3000)}`)
    }
    await new Promise((r) => setTimeout(r, 200))
  }
}

function pointSdkAt(url, key) {
  Object.assign(process.env, { E2B_API_URL: url, E2B_SANDBOX_URL: url, E2B_API_KEY: key })
  delete process.env.E2B_DEBUG
}

async function killSandboxes() {
  for (const info of await Sandbox.list().nextItems()) {
    await Sandbox.kill(info.sandboxId)
  }
}

/** Uses the shared server or starts `nook serve`, and sets the E2B_* variables; returns `{ url, key, stop }`. */
export async function startNook() {
  const { NOOK_TEST_URL: sharedUrl, NOOK_TEST_KEY: sharedKey } = process.env
  if (sharedUrl && sharedKey) {
    pointSdkAt(sharedUrl, sharedKey)
    return { url: sharedUrl, key: sharedKey, stop: killSandboxes }
  }
  const nook = process.env.NOOK_BIN || join(ROOT, 'target/debug/nook')
  const agent = requiredEnv('NOOK_AGENT_BINARY')
  const base = requiredEnv('NOOK_BASE_IMAGE_TAR')
  const port = await freePort()
  const key = `e2b_${randomBytes(20).toString('hex')}`
  const data = mkdtempSync(join(tmpdir(), 'nook-e2b-js-test-'))
  const logPath = join(data, 'serve.log')
  const log = openSync(logPath, 'w')
  const child = spawn(
    nook,
    ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', data, '--no-client-config'],
    {
      env: { ...process.env, NOOK_ADMIN_KEY: key, NOOK_AGENT_BINARY: agent, NOOK_BASE_IMAGE_TAR: base },
      stdio: ['ignore', log, log],
    },
  )
  const exited = new Promise((r) => child.once('exit', r))
  const url = `http://127.0.0.1:${port}`
  try {
    await waitForHealth(url, child, logPath)
  } catch (error) {
    child.kill('SIGKILL')
    closeSync(log)
    await exited
    try {
      rmSync(data, { recursive: true, force: true })
    } catch {
      // left for the system's temp cleaning
    }
    throw error
  }
  pointSdkAt(url, key)

  async function stop() {
    try {
      await killSandboxes()
    } finally {
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
      await exited
      clearTimeout(timer)
      closeSync(log)
      // Best effort, as in tests/e2b: a mount still held by a sandbox must not fail the suite.
      try {
        rmSync(data, { recursive: true, force: true })
      } catch {
        // left for the system's temp cleaning
      }
    }
  }

  return { url, key, stop }
}
