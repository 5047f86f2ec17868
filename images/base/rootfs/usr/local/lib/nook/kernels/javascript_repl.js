'use strict';
/**
 * The Node.js side of nook's JavaScript kernel: javascript_kernel.py starts `node javascript_repl.js REQUESTS
 * REPLIES` once per kernel and sends it cells; this evaluates them one at a time, all in node's main context.
 *
 * Protocol, one JSON object per line: requests {"code": text} come on file descriptor REQUESTS; for each, one
 * reply goes to file descriptor REPLIES: {"status": "ok", "data": {mime type: value}} (data only when the cell has
 * a value) or {"status": "error", "ename", "evalue", "traceback": [lines]}. What a cell prints goes to node's own
 * stdout and stderr (console.log, process.stdout.write, inherited by child processes), which the kernel streams.
 * process.stdout and process.stderr are replaced by streams that write synchronously: node's own streams for pipes
 * queue writes in JavaScript state, which an interrupt (it stops JavaScript wherever it is) can leave broken, so that
 * nothing more would be printed; a synchronous write cannot be left half done, and it puts all of a cell's output
 * into the pipes before the reply. They write to descriptors opened anew on the pipes, which stay blocking whatever
 * child processes that inherit 1 and 2 do to those.
 *
 * Evaluation goes through V8's inspector, Runtime.evaluate in REPL mode (what Chrome's console and Deno's kernel
 * use), so a cell behaves as in a console: top-level `await` works; `let`, `const`, `class` and function
 * declarations persist from cell to cell and may be declared again; the value of the last expression is the result.
 * Results: text/plain is util.inspect(value), and arrays and plain objects that JSON represents exactly also get
 * application/json. An undefined value gives no result.
 *
 * Interrupts (SIGINT): the cell's synchronous part runs inside a vm script with `breakOnSigint`, which stops even a
 * busy loop; a cell waiting on a promise is abandoned by the SIGINT listener. Either way the reply is a
 * KeyboardInterrupt error and the context lives on (an abandoned cell's pending callbacks may still run later). A
 * busy loop after an `await` cannot be stopped from inside; the kernel kills node after a grace period. A SIGINT
 * that comes after its cell ended (the kernel repeats an interrupt a cell is slow to answer) waits in the event loop;
 * each cell first lets the loop turn once, with no cell to abandon, so such a signal never reaches the next cell.
 *
 * `require` resolves from the current working directory, so it finds node's built-in modules and the packages
 * installed where the cell runs. Exceptions thrown outside any cell (in a timer, say) are printed to stderr.
 */
const fs = require('fs');
const inspector = require('inspector');
const { createRequire } = require('module');
const net = require('net');
const path = require('path');
const readline = require('readline');
const { Writable } = require('stream');
const util = require('util');
const vm = require('vm');

const [requestsFd, repliesFd] = process.argv.slice(2).map(Number);

/** Writes all of `bytes` (a Buffer) to `fd`, waiting while the pipe is full. */
function writeAll(fd, bytes) {
  for (let written = 0; written < bytes.length;) {
    written += fs.writeSync(fd, bytes, written);
  }
}

// process.stdout and process.stderr: synchronous writes (see above).
for (const [name, inherited] of [['stdout', 1], ['stderr', 2]]) {
  const fd = fs.openSync(`/proc/self/fd/${inherited}`, 'a');
  const stream = new Writable({
    write(chunk, encoding, callback) {
      writeAll(fd, chunk);
      callback();
    },
  });
  stream.write = (chunk, encoding, callback) => { // the same, without the Writable's bookkeeping
    if (typeof encoding === 'function') {
      [encoding, callback] = [undefined, encoding];
    }
    writeAll(fd, typeof chunk === 'string' ? Buffer.from(chunk, encoding) : chunk);
    if (callback) {
      process.nextTick(callback);
    }
    return true;
  };
  stream.fd = inherited;
  Object.defineProperty(process, name, { configurable: true, enumerable: true, get: () => stream });
}

const session = new inspector.Session();
session.connect();
const post = util.promisify(session.post.bind(session));

// The global slot through which code compiled elsewhere (the vm script, functions run by the inspector) calls back.
const HANDOFF = Symbol.for('nook.handoff');
const callHandoff = new vm.Script('globalThis[Symbol.for("nook.handoff")]()');
const HANDOFF_THIS = 'function () { "use strict"; globalThis[Symbol.for("nook.handoff")](this); }';

// Set while a cell waits on a promise: abandons it.
let interruptCell = null;
process.on('SIGINT', () => interruptCell?.());
process.on('uncaughtException', (error) => console.error('Uncaught', error));
process.on('unhandledRejection', (reason) => console.error('Uncaught (in promise)', reason));

Object.defineProperty(globalThis, 'require', {
  configurable: true,
  get: () => createRequire(path.join(process.cwd(), '[repl]')),
});

const KEYBOARD_INTERRUPT = {
  status: 'error',
  ename: 'KeyboardInterrupt',
  evalue: 'interrupted',
  traceback: ['KeyboardInterrupt: interrupted'],
};

/** Runs one cell; returns its reply. */
async function runCell(code) {
  await new Promise(setImmediate); // signals that came between cells are handled (and dropped) here
  let evaluation;
  globalThis[HANDOFF] = () => {
    evaluation = post('Runtime.evaluate', { expression: code, replMode: true, objectGroup: 'cell' });
  };
  try {
    callHandoff.runInThisContext({ breakOnSigint: true });
  } catch (error) {
    if (error.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED') {
      evaluation?.catch(() => {}); // its answer, if one ever comes, is of no use now
      return KEYBOARD_INTERRUPT;
    }
    throw error;
  }
  try {
    const outcome = await Promise.race([evaluation, new Promise((resolve) => { interruptCell = resolve; })]);
    interruptCell = null;
    if (outcome === undefined) {
      return KEYBOARD_INTERRUPT;
    }
    const { result, exceptionDetails } = outcome;
    if (exceptionDetails) {
      const thrown = exceptionDetails.exception
        ? await localValue(exceptionDetails.exception)
        : new Error(exceptionDetails.text);
      return errorReply(thrown, exceptionDetails);
    }
    const value = await localValue(result);
    return value === undefined ? { status: 'ok' } : { status: 'ok', data: mimeBundle(value) };
  } finally {
    interruptCell = null;
    await post('Runtime.releaseObjectGroup', { objectGroup: 'cell' });
  }
}

/** The value an inspector RemoteObject describes. */
async function localValue(remote) {
  if (remote.objectId) {
    let value;
    globalThis[HANDOFF] = (object) => { value = object; };
    await post('Runtime.callFunctionOn', { objectId: remote.objectId, functionDeclaration: HANDOFF_THIS });
    return value;
  }
  if ('unserializableValue' in remote) { // NaN, Infinity, -Infinity, -0 and bigints such as 12n
    const text = remote.unserializableValue;
    return text.endsWith('n') ? BigInt(text.slice(0, -1)) : Number(text);
  }
  return remote.value; // a JSON value; absent for undefined
}

/** The reply for a thrown value; `details` (the inspector's exceptionDetails) locates syntax errors. */
function errorReply(thrown, details) {
  if (!(util.types.isNativeError(thrown) || thrown instanceof Error)) {
    const evalue = util.inspect(thrown);
    return { status: 'error', ename: 'Uncaught', evalue, traceback: [`Uncaught ${evalue}`] };
  }
  const ename = String(thrown.name);
  const evalue = String(thrown.message);
  // The stack down to the first frame of this server (the inspector call that ran the cell).
  const lines = String(thrown.stack || `${ename}: ${evalue}`).split('\n');
  const ours = lines.findIndex((line) => line.includes('(node:inspector') || line.includes(__filename));
  const traceback = ours === -1 ? lines : lines.slice(0, ours);
  if (ename === 'SyntaxError' && details && !traceback.some((line) => line.startsWith('    at '))) {
    traceback.push(`    at <anonymous>:${details.lineNumber + 1}:${details.columnNumber + 1}`);
  }
  return { status: 'error', ename, evalue, traceback };
}

function mimeBundle(value) {
  const data = { 'text/plain': util.inspect(value) };
  if (typeof value === 'object' && value !== null) {
    try {
      const copy = JSON.parse(JSON.stringify(value));
      if (util.isDeepStrictEqual(copy, value)) {
        data['application/json'] = copy;
      }
    } catch {
      // not JSON data (a cycle, a bigint, ...)
    }
  }
  return data;
}

async function main() {
  const requests = readline.createInterface({ input: new net.Socket({ fd: requestsFd, readable: true }) });
  for await (const line of requests) {
    let message;
    try {
      message = await runCell(JSON.parse(line).code);
    } catch (error) {
      message = errorReply(error);
    }
    writeAll(repliesFd, Buffer.from(`${JSON.stringify(message)}\n`));
  }
  process.exit(0);
}

main();
