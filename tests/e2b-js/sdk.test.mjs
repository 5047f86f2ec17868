// The official `e2b` JavaScript SDK, unmodified, against nook: lifecycle, commands, terminals, files and template
// builds. Each test asserts what an app written for E2B relies on.

import assert from 'node:assert/strict'
import { after, before, beforeEach, afterEach, describe, test } from 'node:test'

import { mkdtemp, mkdir, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import {
  BuildError,
  CommandExitError,
  FileNotFoundError,
  FileType,
  FilesystemEventType,
  NotFoundError,
  Sandbox,
  SandboxNotFoundError,
  Template,
  TimeoutError,
  waitForPort,
} from 'e2b'

import { startNook } from './nook-server.mjs'

let nook

before(async () => {
  nook = await startNook()
})

after(async () => {
  await nook?.stop()
})

/** Polls `predicate` every 100 ms until it holds; fails after `ms` with `message()`. */
async function eventually(predicate, message, ms = 20_000) {
  const deadline = Date.now() + ms
  while (!(await predicate())) {
    assert.ok(Date.now() < deadline, message())
    await new Promise((r) => setTimeout(r, 100))
  }
}

describe('sandbox lifecycle', () => {
  test('create, getInfo, list, setTimeout, connect and kill', async () => {
    const sbx = await Sandbox.create({
      timeoutMs: 120_000,
      metadata: { suite: 'e2b-js', owner: 'bob jones' },
      envs: { GREETING: 'hello from js' },
    })
    try {
      assert.match(sbx.sandboxId, /^\S+$/)
      const info = await sbx.getInfo()
      assert.equal(info.sandboxId, sbx.sandboxId)
      assert.equal(info.templateId, 'base')
      assert.deepEqual(info.metadata, { suite: 'e2b-js', owner: 'bob jones' })
      assert.equal(info.state, 'running')
      assert.ok(info.startedAt instanceof Date && info.endAt instanceof Date)
      const lifetime = info.endAt.getTime() - info.startedAt.getTime()
      assert.ok(lifetime > 100_000 && lifetime <= 121_000, `lifetime ${lifetime} ms`)
      assert.ok(info.cpuCount >= 1 && info.memoryMB >= 1, JSON.stringify(info))
      assert.equal(await sbx.isRunning(), true)
      // Sandbox-wide env vars reach commands.
      assert.equal((await sbx.commands.run('echo $GREETING')).stdout, 'hello from js\n')

      const listed = await Sandbox.list({ query: { metadata: { owner: 'bob jones' } } }).nextItems()
      assert.deepEqual(
        listed.map((item) => item.sandboxId),
        [sbx.sandboxId],
      )
      assert.deepEqual(listed[0].metadata, { suite: 'e2b-js', owner: 'bob jones' })
      assert.deepEqual(await Sandbox.list({ query: { metadata: { owner: 'nobody' } } }).nextItems(), [])
      const running = await Sandbox.list({ query: { state: ['running'] } }).nextItems()
      assert.ok(running.some((item) => item.sandboxId === sbx.sandboxId))

      // Pages of one follow the next token until both sandboxes of this owner are seen.
      const second = await Sandbox.create('base', { timeoutMs: 60_000, metadata: { owner: 'bob jones' } })
      try {
        const pages = Sandbox.list({ query: { metadata: { owner: 'bob jones' } }, limit: 1 })
        const first = await pages.nextItems()
        assert.equal(first.length, 1)
        assert.equal(pages.hasNext, true)
        const next = await pages.nextItems()
        assert.equal(next.length, 1)
        assert.deepEqual(
          [...first, ...next].map((item) => item.sandboxId).sort(),
          [sbx.sandboxId, second.sandboxId].sort(),
        )
        assert.equal(pages.hasNext, false)
      } finally {
        await second.kill()
      }
      assert.equal(await second.isRunning(), false)

      const before = info.endAt.getTime()
      await sbx.setTimeout(600_000)
      const extended = (await sbx.getInfo()).endAt.getTime()
      assert.ok(extended >= before + 400_000, `endAt moved from ${before} to ${extended}`)
      // The static form works on an id.
      await Sandbox.setTimeout(sbx.sandboxId, 300_000)
      assert.ok((await Sandbox.getInfo(sbx.sandboxId)).endAt.getTime() < extended)

      const again = await Sandbox.connect(sbx.sandboxId)
      assert.equal(again.sandboxId, sbx.sandboxId)
      assert.equal((await again.commands.run('echo connected')).stdout, 'connected\n')
      // A file written through one handle is visible through the other: the same sandbox.
      await sbx.files.write('/tmp/shared.txt', 'one sandbox')
      assert.equal(await again.files.read('/tmp/shared.txt'), 'one sandbox')
    } finally {
      assert.equal(await sbx.kill(), true)
    }
    assert.equal(await Sandbox.kill(sbx.sandboxId), false)
    await assert.rejects(Sandbox.getInfo(sbx.sandboxId), SandboxNotFoundError)
    await assert.rejects(Sandbox.connect(sbx.sandboxId), NotFoundError)
    await assert.rejects(Sandbox.create('no-such-template', { timeoutMs: 60_000 }), /no-such-template/)
    const remaining = await Sandbox.list().nextItems()
    assert.ok(!remaining.some((item) => item.sandboxId === sbx.sandboxId))
  })

  test('the timeout kills the sandbox', async () => {
    const sbx = await Sandbox.create({ timeoutMs: 2_000 })
    assert.equal(await sbx.isRunning(), true)
    await eventually(
      async () => !(await Sandbox.list().nextItems()).some((item) => item.sandboxId === sbx.sandboxId),
      () => 'the sandbox outlived its timeout',
      30_000,
    )
    await assert.rejects(Sandbox.getInfo(sbx.sandboxId), SandboxNotFoundError)
  })

  test('a sandbox created to pause on timeout is paused with its files, and connect resumes it', async () => {
    const sbx = await Sandbox.create({
      timeoutMs: 300_000,
      lifecycle: { onTimeout: { action: 'pause', keepMemory: false } },
    })
    try {
      await sbx.files.write('/home/user/kept.txt', 'survives the pause')
      // The timeout is cut short only now, so a slow create cannot pause the sandbox before the write.
      await Sandbox.setTimeout(sbx.sandboxId, 1_000)
      await eventually(
        async () => (await Sandbox.getInfo(sbx.sandboxId)).state === 'paused',
        () => 'the sandbox was not paused at its timeout',
        30_000,
      )
      const paused = await Sandbox.list({ query: { state: ['paused'] } }).nextItems()
      assert.ok(paused.some((item) => item.sandboxId === sbx.sandboxId))

      const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
      assert.equal((await resumed.getInfo()).state, 'running')
      assert.equal(await resumed.files.read('/home/user/kept.txt'), 'survives the pause')
      assert.equal((await resumed.commands.run('cat kept.txt')).stdout, 'survives the pause')
    } finally {
      await Sandbox.kill(sbx.sandboxId)
    }
  })
})

describe('in one sandbox', () => {
  let sandbox

  beforeEach(async () => {
    sandbox = await Sandbox.create({ timeoutMs: 300_000 })
  })

  afterEach(async () => {
    await sandbox.kill()
  })

  test('commands.run: stdout, stderr, exit codes, envs, cwd, users and timeouts', async () => {
    const result = await sandbox.commands.run('echo out; echo err >&2; whoami; pwd')
    assert.equal(result.stdout, 'out\nuser\n/home/user\n')
    assert.equal(result.stderr, 'err\n')
    assert.equal(result.exitCode, 0)

    const failed = await sandbox.commands.run('echo partial; echo oops >&2; exit 3').then(
      () => assert.fail('a command that exits 3 must throw'),
      (error) => error,
    )
    assert.ok(failed instanceof CommandExitError, String(failed))
    assert.equal(failed.exitCode, 3)
    assert.equal(failed.stdout, 'partial\n')
    assert.equal(failed.stderr, 'oops\n')

    assert.equal((await sandbox.commands.run('echo $A-$B', { envs: { A: '1', B: 'two' } })).stdout, '1-two\n')
    assert.equal((await sandbox.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
    assert.equal((await sandbox.commands.run('whoami; id -u; echo $HOME', { user: 'root' })).stdout, 'root\n0\n/root\n')
    assert.equal((await sandbox.commands.run('whoami; id -u', { user: 'user' })).stdout, 'user\n1000\n')

    const stdout = []
    const stderr = []
    await sandbox.commands.run('for i in 1 2 3; do echo line$i; echo err$i >&2; done', {
      onStdout: (data) => stdout.push(data),
      onStderr: (data) => stderr.push(data),
    })
    assert.equal(stdout.join(''), 'line1\nline2\nline3\n')
    assert.equal(stderr.join(''), 'err1\nerr2\nerr3\n')

    const big = await sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' a; echo")
    assert.equal(big.stdout.length, 3_000_001)
    assert.ok(/^a+\n$/.test(big.stdout))

    const started = Date.now()
    await assert.rejects(sandbox.commands.run('sleep 30', { timeoutMs: 1_000 }), TimeoutError)
    assert.ok(Date.now() - started < 15_000, 'the command timeout did not cut the command short')
  })

  test('background commands: list, sendStdin, closeStdin, connect and kill', async () => {
    const cat = await sandbox.commands.run('cat', { background: true, stdin: true })
    assert.ok(cat.pid > 0)
    await sandbox.commands.sendStdin(cat.pid, 'echo me\n')
    await cat.sendStdin(new TextEncoder().encode('and bytes\n'))
    await sandbox.commands.closeStdin(cat.pid)
    const catResult = await cat.wait()
    assert.equal(catResult.stdout, 'echo me\nand bytes\n')
    assert.equal(catResult.exitCode, 0)

    const sleeper = await sandbox.commands.run('echo started; sleep 300', { background: true })
    await eventually(
      () => sleeper.stdout === 'started\n',
      () => `stdout so far: ${JSON.stringify(sleeper.stdout)}`,
    )
    const processes = await sandbox.commands.list()
    const listed = processes.find((process) => process.pid === sleeper.pid)
    assert.ok(listed, JSON.stringify(processes))
    assert.equal(listed.cmd, '/bin/bash')
    assert.deepEqual(listed.args, ['-l', '-c', 'echo started; sleep 300'])

    const reattached = await sandbox.commands.connect(sleeper.pid)
    assert.equal(reattached.pid, sleeper.pid)
    assert.equal(await sandbox.commands.kill(sleeper.pid), true)
    const killed = await reattached.wait().then(
      () => assert.fail('a killed command must throw'),
      (error) => error,
    )
    assert.ok(killed instanceof CommandExitError, String(killed))
    assert.notEqual(killed.exitCode, 0)
    assert.equal(await sandbox.commands.kill(sleeper.pid), false)
    // As in envd, an ended process can still be connected to for a while: the stream carries its end.
    const ended = await sandbox.commands.connect(sleeper.pid)
    const endedError = await ended.wait().then(
      () => assert.fail('the end of a killed command must throw'),
      (error) => error,
    )
    assert.ok(endedError instanceof CommandExitError, String(endedError))
    assert.equal(endedError.exitCode, killed.exitCode)
    await assert.rejects(sandbox.commands.connect(999_999), NotFoundError)
    assert.equal(await sandbox.commands.kill(999_999), false)

    // A background command's own handle can kill it, and its output arrives through the callback.
    const lines = []
    const ticker = await sandbox.commands.run('echo tick; sleep 300', {
      background: true,
      onStdout: (data) => lines.push(data),
    })
    await eventually(
      () => lines.join('') === 'tick\n',
      () => `callback got ${JSON.stringify(lines)}`,
    )
    assert.equal(await ticker.kill(), true)
    await assert.rejects(ticker.wait(), CommandExitError)
  })

  test('pty: create, sendInput, resize and kill', async () => {
    const output = []
    const terminal = await sandbox.pty.create({
      rows: 24,
      cols: 80,
      envs: { PTY_GREETING: 'from-env' },
      cwd: '/tmp',
      onData: (data) => output.push(Buffer.from(data)),
    })
    assert.ok(terminal.pid > 0)
    const encode = (text) => new TextEncoder().encode(text)
    await sandbox.pty.sendInput(terminal.pid, encode('tty; echo $((6*7)); echo $PTY_GREETING; pwd; stty size\n'))
    await eventually(
      () => Buffer.concat(output).includes('24 80'),
      () => `terminal output: ${Buffer.concat(output)}`,
    )
    await sandbox.pty.resize(terminal.pid, { rows: 30, cols: 100 })
    await sandbox.pty.sendInput(terminal.pid, encode('stty size; exit 0\n'))
    const result = await terminal.wait()
    assert.equal(result.exitCode, 0)
    const text = Buffer.concat(output).toString()
    for (const expected of ['/dev/pts/', '42', 'from-env', '/tmp', '24 80', '30 100']) {
      assert.ok(text.includes(expected), `${JSON.stringify(expected)} missing from ${JSON.stringify(text)}`)
    }

    // A terminal outlives its first handle: disconnect, then connect again and keep typing.
    const first = []
    const shell = await sandbox.pty.create({ rows: 24, cols: 80, onData: (data) => first.push(Buffer.from(data)) })
    await shell.disconnect()
    const again = []
    const reattached = await sandbox.pty.connect(shell.pid, { onData: (data) => again.push(Buffer.from(data)) })
    assert.equal(reattached.pid, shell.pid)
    await sandbox.pty.sendInput(shell.pid, encode('echo re$((1+1))attached; exit 0\n'))
    assert.equal((await reattached.wait()).exitCode, 0)
    assert.ok(Buffer.concat(again).includes('re2attached'), Buffer.concat(again).toString())
    assert.ok(!Buffer.concat(first).includes('re2attached'), 'output reached a disconnected handle')

    const other = await sandbox.pty.create({ rows: 24, cols: 80, onData: () => {} })
    assert.equal(await sandbox.pty.kill(other.pid), true)
    await assert.rejects(other.wait(), CommandExitError)
    assert.equal(await sandbox.pty.kill(other.pid), false)
  })

  test('files: read and write text, bytes, blobs and many files', async () => {
    const info = await sandbox.files.write('notes/today.txt', 'hello files ✓')
    assert.equal(info.path, '/home/user/notes/today.txt')
    assert.equal(info.name, 'today.txt')
    assert.equal(info.type, FileType.FILE)
    assert.equal(await sandbox.files.read('/home/user/notes/today.txt'), 'hello files ✓')
    assert.equal(await sandbox.files.read('notes/today.txt'), 'hello files ✓')

    const payload = new Uint8Array(1024 * 1024)
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) % 256
    await sandbox.files.write('/tmp/blob.bin', payload.buffer)
    const read = await sandbox.files.read('/tmp/blob.bin', { format: 'bytes' })
    assert.ok(read instanceof Uint8Array)
    assert.equal(read.length, payload.length)
    assert.ok(Buffer.from(read).equals(Buffer.from(payload)), 'the bytes read back differ')
    assert.equal((await sandbox.commands.run('stat -c %s /tmp/blob.bin')).stdout, `${payload.length}\n`)

    await sandbox.files.write('/tmp/from-blob.txt', new Blob(['blob ', 'parts']))
    const blob = await sandbox.files.read('/tmp/from-blob.txt', { format: 'blob' })
    assert.ok(blob instanceof Blob)
    assert.equal(await blob.text(), 'blob parts')
    const stream = await sandbox.files.read('/tmp/from-blob.txt', { format: 'stream' })
    assert.equal(await new Response(stream).text(), 'blob parts')

    const streamed = new ReadableStream({
      start(controller) {
        for (const part of ['streamed ', 'in ', 'parts']) controller.enqueue(new TextEncoder().encode(part))
        controller.close()
      },
    })
    await sandbox.files.write('/tmp/streamed.txt', streamed)
    assert.equal(await sandbox.files.read('/tmp/streamed.txt'), 'streamed in parts')

    const files = Array.from({ length: 12 }, (_, i) => ({ path: `/home/user/many/f${i}.txt`, data: `file ${i}` }))
    const written = await sandbox.files.write(files)
    assert.deepEqual(written.map((entry) => entry.path).sort(), files.map((file) => file.path).sort())
    assert.equal((await sandbox.commands.run('cat /home/user/many/f0.txt /home/user/many/f11.txt')).stdout, 'file 0file 11')
    // Written as the default user, not root; as root when asked.
    assert.equal(
      (await sandbox.commands.run('stat -c %U /home/user/notes /home/user/notes/today.txt /home/user/many/f3.txt'))
        .stdout,
      'user\nuser\nuser\n',
    )
    const rootInfo = await sandbox.files.write('/root/secret.txt', 'root only', { user: 'root' })
    assert.equal(rootInfo.path, '/root/secret.txt')
    assert.equal((await sandbox.commands.run('stat -c %U /root/secret.txt', { user: 'root' })).stdout, 'root\n')
    assert.equal(await sandbox.files.read('/root/secret.txt', { user: 'root' }), 'root only')

    await assert.rejects(sandbox.files.read('/home/user/missing.txt'), FileNotFoundError)
  })

  test('files: gzip and streamed uploads, metadata, and signed URLs for plain fetch', async () => {
    // Streams and gzip go up as raw octet-stream bodies (gzip through the runtime's CompressionStream).
    const parts = () =>
      new ReadableStream({
        start(controller) {
          for (let i = 0; i < 64; i++) controller.enqueue(new Uint8Array(16 * 1024).fill(i))
          controller.close()
        },
      })
    const zipped = await sandbox.files.write('/tmp/parts.gz.bin', parts(), { gzip: true, metadata: { Kind: 'parts' } })
    assert.deepEqual(zipped.metadata, { kind: 'parts' })
    await sandbox.files.write('/tmp/parts.bin', parts())
    const sums = (await sandbox.commands.run('sha256sum < /tmp/parts.bin; sha256sum < /tmp/parts.gz.bin')).stdout
    const [plain, inflated] = sums.split('\n')
    assert.equal(plain, inflated)
    const read = await sandbox.files.read('/tmp/parts.gz.bin', { format: 'bytes', gzip: true })
    assert.equal(read.length, 64 * 16 * 1024)
    assert.equal(read[read.length - 1], 63)

    // Metadata round trip: on the answer, getInfo and list; the next upload replaces it.
    const info = await sandbox.files.write('/home/user/meta.txt', 'm', { metadata: { author: 'ada', n: '1' } })
    assert.deepEqual(info.metadata, { author: 'ada', n: '1' })
    assert.deepEqual((await sandbox.files.getInfo('/home/user/meta.txt')).metadata, { author: 'ada', n: '1' })
    const listed = (await sandbox.files.list('/home/user')).find((entry) => entry.name === 'meta.txt')
    assert.deepEqual(listed.metadata, { author: 'ada', n: '1' })
    await sandbox.files.write('/home/user/meta.txt', 'again')
    assert.equal((await sandbox.files.getInfo('/home/user/meta.txt')).metadata, undefined)

    // Signed URLs: fetch with nothing but the URL; expired or reused for another operation, refused.
    const download = await sandbox.downloadUrl('/home/user/meta.txt')
    assert.equal(await (await fetch(download)).text(), 'again')
    const upload = await sandbox.uploadUrl('/home/user/up.txt', { useSignatureExpiration: 60 })
    const form = new FormData()
    form.append('file', new Blob(['uploaded by fetch']), 'up.txt')
    assert.equal((await fetch(upload, { method: 'POST', body: form })).status, 200)
    assert.equal(await sandbox.files.read('/home/user/up.txt'), 'uploaded by fetch')
    const expired = await sandbox.downloadUrl('/home/user/meta.txt', { useSignatureExpiration: -5 })
    assert.equal((await fetch(expired)).status, 401)
    // Refused before its body is read: the body is still taken in, so the client sees the answer.
    assert.equal((await fetch(download, { method: 'POST', body: form })).status, 401)

    // Watch events carry the entry when asked.
    await sandbox.files.makeDir('/home/user/entries')
    const events = []
    const watcher = await sandbox.files.watchDir('/home/user/entries', (event) => events.push(event), {
      includeEntry: true,
      allowNetworkMounts: true,
    })
    await sandbox.commands.run('mkdir /home/user/entries/d && chmod 700 /home/user/entries/d')
    const chmod = () => events.find((event) => event.name === 'd' && event.type === FilesystemEventType.CHMOD)
    await eventually(chmod, () => JSON.stringify(events))
    await watcher.stop()
    assert.equal(chmod().entry.path, '/home/user/entries/d')
    assert.equal(chmod().entry.type, 'dir')
    assert.equal(chmod().entry.mode, 0o700)
  })

  test('files: list, makeDir, rename, remove, exists and getInfo', async () => {
    await sandbox.files.write([
      { path: '/home/user/tree/a.txt', data: 'a' },
      { path: '/home/user/tree/sub/b.txt', data: 'bb' },
    ])
    const entries = await sandbox.files.list('/home/user/tree')
    assert.deepEqual(
      entries.map((entry) => [entry.name, entry.type, entry.path]).sort(),
      [
        ['a.txt', FileType.FILE, '/home/user/tree/a.txt'],
        ['sub', FileType.DIR, '/home/user/tree/sub'],
      ],
    )
    const deep = await sandbox.files.list('/home/user/tree', { depth: 2 })
    assert.deepEqual(deep.map((entry) => entry.path).sort(), [
      '/home/user/tree/a.txt',
      '/home/user/tree/sub',
      '/home/user/tree/sub/b.txt',
    ])

    assert.equal(await sandbox.files.exists('/home/user/tree/a.txt'), true)
    assert.equal(await sandbox.files.exists('/home/user/tree/sub'), true)
    assert.equal(await sandbox.files.exists('/home/user/missing'), false)

    assert.equal(await sandbox.files.makeDir('/home/user/newdir/nested'), true)
    assert.equal(await sandbox.files.makeDir('/home/user/newdir/nested'), false)
    const dirInfo = await sandbox.files.getInfo('/home/user/newdir/nested')
    assert.equal(dirInfo.type, FileType.DIR)
    assert.equal(dirInfo.owner, 'user')

    const moved = await sandbox.files.rename('/home/user/tree/sub/b.txt', '/home/user/newdir/b.txt')
    assert.equal(moved.path, '/home/user/newdir/b.txt')
    assert.equal(moved.name, 'b.txt')
    assert.equal(await sandbox.files.exists('/home/user/tree/sub/b.txt'), false)
    assert.equal(await sandbox.files.read('/home/user/newdir/b.txt'), 'bb')

    const entry = await sandbox.files.getInfo('/home/user/newdir/b.txt')
    assert.equal(entry.name, 'b.txt')
    assert.equal(entry.type, FileType.FILE)
    assert.equal(entry.size, 2)
    assert.equal(entry.owner, 'user')
    assert.equal(entry.group, 'user')
    assert.equal(entry.permissions, '-rw-r--r--')
    assert.equal(entry.mode & 0o777, 0o644)
    assert.ok(entry.modifiedTime instanceof Date)
    assert.ok(Math.abs(entry.modifiedTime.getTime() - Date.now()) < 120_000, String(entry.modifiedTime))
    await assert.rejects(sandbox.files.getInfo('/home/user/missing'), FileNotFoundError)

    await sandbox.files.remove('/home/user/newdir')
    assert.equal(await sandbox.files.exists('/home/user/newdir'), false)
    await assert.rejects(sandbox.files.read('/home/user/newdir/b.txt'), FileNotFoundError)
    await assert.rejects(sandbox.files.list('/home/user/newdir'), FileNotFoundError)
  })

  test('files: watchDir reports create, write, rename and remove', async () => {
    await sandbox.files.makeDir('/home/user/watched')
    const events = []
    const watcher = await sandbox.files.watchDir('/home/user/watched', (event) => events.push(event))
    const seen = (name, type) => events.some((event) => event.name === name && event.type === type)
    const describeEvents = () => JSON.stringify(events)

    await sandbox.commands.run('echo x > /home/user/watched/new.txt')
    await eventually(() => seen('new.txt', FilesystemEventType.CREATE), describeEvents)
    await eventually(() => seen('new.txt', FilesystemEventType.WRITE), describeEvents)
    await sandbox.commands.run('mv /home/user/watched/new.txt /home/user/watched/moved.txt')
    await eventually(() => seen('new.txt', FilesystemEventType.RENAME), describeEvents)
    await sandbox.commands.run('rm /home/user/watched/moved.txt')
    await eventually(() => seen('moved.txt', FilesystemEventType.REMOVE), describeEvents)
    await watcher.stop()

    const count = events.length
    await sandbox.commands.run('touch /home/user/watched/after-stop.txt')
    await new Promise((r) => setTimeout(r, 500))
    assert.equal(events.length, count, 'events arrived after stop()')

    const recursive = []
    const deep = await sandbox.files.watchDir('/home/user/watched', (event) => recursive.push(event), {
      recursive: true,
    })
    await sandbox.commands.run('mkdir -p /home/user/watched/sub && echo y > /home/user/watched/sub/deep.txt')
    await eventually(
      () => recursive.some((event) => event.name === 'sub/deep.txt' && event.type === FilesystemEventType.CREATE),
      () => JSON.stringify(recursive),
    )
    await deep.stop()

    await assert.rejects(sandbox.files.watchDir('/home/user/not-there', () => {}), FileNotFoundError)
  })
})

describe('templates', () => {
  test('Template.build copies files, runs steps, and sandboxes start with the start command ready', async () => {
    const context = await mkdtemp(join(tmpdir(), 'nook-js-template-'))
    await mkdir(join(context, 'site'))
    await writeFile(join(context, 'site', 'index.html'), 'built with the js sdk\n')
    const name = `js-template-${Date.now().toString(36)}`
    const template = Template({ fileContextPath: context })
      .fromBaseImage()
      .copy('site/', '/srv/site/')
      .runCmd('echo "built as $(id -un)" > /srv/site/who.txt', { user: 'root' })
      .setEnvs({ SITE: '/srv/site' })
      .setStartCmd('cd /srv/site && python3 -m http.server 8000', waitForPort(8000))
    const logs = []
    const info = await Template.build(template, name, { onBuildLogs: (entry) => logs.push(entry.message) })
    assert.equal(info.templateId, name)
    assert.ok(await Template.exists(name))

    const sbx = await Sandbox.create(name, { timeoutMs: 120_000 })
    try {
      const page = await sbx.commands.run('curl -s http://127.0.0.1:8000/index.html; cat $SITE/who.txt; id -un')
      assert.equal(page.stdout, 'built with the js sdk\nbuilt as root\nuser\n')
    } finally {
      await sbx.kill()
    }

    const failing = Template().fromBaseImage().runCmd('echo broken >&2; exit 5')
    await assert.rejects(Template.build(failing, `${name}-broken`), (error) => {
      assert.ok(error instanceof BuildError, String(error))
      assert.match(error.message, /exit code 5/)
      return true
    })
  })
})

describe('snapshots and forks', () => {
  test('createSnapshot, Sandbox.create from it, listSnapshots, deleteSnapshot and fork', async () => {
    const path = '/home/user/state.txt'
    const sbx = await Sandbox.create({ timeoutMs: 120_000 })
    const made = []
    try {
      await sbx.files.write(path, 'first')
      const snapshot = await sbx.createSnapshot()
      assert.ok(snapshot.snapshotId)
      assert.deepEqual(snapshot.names, [snapshot.snapshotId])
      await sbx.files.write(path, 'second')

      const restored = await Sandbox.create(snapshot.snapshotId, { timeoutMs: 120_000 })
      made.push(restored)
      assert.equal(await restored.files.read(path), 'first')

      const paginator = sbx.listSnapshots()
      const listed = await paginator.nextItems()
      assert.deepEqual(
        listed.map((item) => item.snapshotId),
        [snapshot.snapshotId]
      )
      assert.equal(paginator.hasNext, false)
      assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), true)
      assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), false)

      const forks = await sbx.fork({ count: 2, timeoutMs: 120_000 })
      assert.equal(forks.length, 2)
      for (const fork of forks) {
        assert.ok(fork instanceof Sandbox, String(fork))
        made.push(fork)
        assert.equal(await fork.files.read(path), 'second')
      }
      await forks[0].files.write(path, 'the first fork')
      assert.equal(await forks[1].files.read(path), 'second')
      assert.equal(await sbx.files.read(path), 'second')
      assert.equal(await sbx.isRunning(), true)
    } finally {
      for (const other of made) await other.kill()
      await sbx.kill()
    }
  })
})
