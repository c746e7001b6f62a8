/**
 * The browser's side of presence's sharing endpoint (presence/jupyter/sharing.py).
 *
 * The page never calls the hub: this server does, with the token of the user who asks,
 * and only for its owner. ServerConnection adds the page's credentials (its token, or
 * the XSRF header when the page is logged in by cookie).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Someone (a user or a group) who holds access to this server. */
export interface IShare {
  kind: 'user' | 'group';
  name: string;
  scopes: string[];
  created_at: string;
}

/** A share link (a code) that has not expired; the code itself is shown only once. */
export interface ICode {
  id: string;
  created_at: string;
  expires_at: string | null;
  exchange_count: number;
  last_exchanged_at: string | null;
}

export interface IAccess {
  owner: string;
  server_name: string;
  hub_version: string;
  shares: IShare[];
  codes: ICode[];
}

export interface INewCode {
  id: string;
  /** Absolute when the hub knows its public URL, else a path on the hub's host. */
  accept_url: string;
  expires_at: string;
  /** Where the collaborator lands after accepting (a notebook, or the server). */
  next: string;
}

/** An answer the user can act on: `message` says what to do. */
export class SharingError extends Error {
  constructor(
    message: string,
    readonly reason: string
  ) {
    super(message);
  }
}

const settings = ServerConnection.makeSettings();

async function call<T>(
  path: string,
  init: RequestInit = {},
  query: Record<string, string> = {}
): Promise<T> {
  let url = URLExt.join(settings.baseUrl, 'presence/sharing', path);
  const search = new URLSearchParams(query).toString();
  if (search) {
    url += '?' + search;
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new SharingError(
      `This server did not answer (${String(error)}). Try again in a moment.`,
      'unreachable'
    );
  }
  if (response.status === 204) {
    return undefined as T;
  }
  let body: any = null;
  try {
    body = await response.json();
  } catch {
    // an error page of a proxy, say: described below by its status
  }
  if (!response.ok) {
    if (response.status === 404 && (body === null || !body.reason)) {
      throw new SharingError(
        "This server has no sharing endpoint: presence's server extension " +
          '(presence.jupyter) is not enabled here. Ask your hub admin.',
        'no_extension'
      );
    }
    const message = body?.message || `${response.status} ${response.statusText}`;
    throw new SharingError(message, body?.reason || 'error');
  }
  return body as T;
}

export function access(): Promise<IAccess> {
  return call<IAccess>('');
}

export function createCode(expiresIn: number, path: string | null): Promise<INewCode> {
  return call<INewCode>('codes', {
    method: 'POST',
    body: JSON.stringify({ expires_in: expiresIn, path })
  });
}

export function revokeCode(id: string): Promise<void> {
  return call<void>(`codes/${encodeURIComponent(id)}`, { method: 'DELETE' });
}

export function revokeShare(share: IShare): Promise<void> {
  return call<void>('shares', { method: 'DELETE' }, { [share.kind]: share.name });
}

/** The link as the collaborator opens it: on the hub's host. */
export function absolute(acceptUrl: string, hubHost: string): string {
  return new URL(acceptUrl, hubHost || window.location.origin).href;
}
